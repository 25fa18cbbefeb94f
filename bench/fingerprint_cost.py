"""Cost of Load Dataset's fingerprint (what ComfyUI calls on every Queue to see whether the folder changed)
on a large folder, against reading the dataset itself (Load Dataset's own work: listing, captions, image headers).

    python bench/fingerprint_cost.py [--images 10000] [--repeats 5] [--folder DIR]

Writes --images small PNGs with a .txt caption each into a temporary folder (or DIR, kept) in a kohya
``10_name`` sub-folder, then times, best of --repeats with a warm file-system cache:
  * fingerprint: ``folders_fingerprint`` over the folders Load Dataset reads (stat of every file);
  * load: ``build_dataset`` over the same folder (what a re-run of Load Dataset costs).
Prints both in ms and their ratio. Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trainer_core.data.buckets import BucketConfig  # noqa: E402
from trainer_core.data.dataset import build_dataset, subsets_from_folder  # noqa: E402
from trainer_core.data.fingerprint import folders_fingerprint, subset_folders  # noqa: E402


def make(folder: str, n: int) -> None:
    sub = os.path.join(folder, "10_toy")
    os.makedirs(sub, exist_ok=True)
    img = Image.new("RGB", (64, 48), (120, 30, 200))
    for i in range(n):
        path = os.path.join(sub, f"img_{i:05d}.png")
        if not os.path.exists(path):
            img.save(path)
            with open(path[:-4] + ".txt", "w") as f:
                f.write(f"toy, picture {i}\n")


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--folder", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder or tmp
        make(folder, a.images)
        files = sum(len(fs) for _, _, fs in os.walk(folder))

        def fingerprint():
            return folders_fingerprint([folder] + subset_folders(subsets_from_folder(folder)))

        def load():
            return build_dataset(subsets_from_folder(folder), BucketConfig((512, 512), True, 256, 1024, 64))

        fp, ld = best(fingerprint, a.repeats), best(load, max(1, a.repeats // 2))
        print(f"{a.images} images, {files} files")
        print(f"fingerprint: {fp * 1000:.1f} ms ({fp / files * 1e6:.2f} µs per file)")
        print(f"load dataset: {ld * 1000:.1f} ms")
        print(f"fingerprint / load: {fp / ld:.3f}")


if __name__ == "__main__":
    main()
