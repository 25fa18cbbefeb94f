"""Cache Latents throughput: Kiln's node versus calling the VAE directly, and a fully cached second run.

    $KILN_PYTHON bench/cache_throughput.py [--images 48] [--resolution 256] [--batch 4] [--repeats 3]
                                           [--threads N] [--gpu] [--json out.json]

Runs in a real ComfyUI (KILN_COMFYUI from .kiln/env) loaded by tests/conftest.py's ComfyInProcess, with the
VAE of the tiny random-weight SD1 checkpoint (tests/fixtures/tiny_models.py; TAESD-format, so it is small
and fast, which makes Kiln's own overhead, not the VAE, the thing measured). The images are generated
(smooth gradients with shapes, JPEG and PNG alternating, resolution² pixels each) and buckets are off, so
every VAE batch has the same shape in both paths.

What is timed (best of --repeats, each path run in turn so that warm-up and machine load hit them alike):
  * direct: ``vae.encode`` (ComfyUI's VAE object, as any node calls it) on the very same pixel tensors, in the
    same batches, already in memory: the VAE's own cost and nothing else;
  * cache (memory): the whole KilnCacheLatents node with the disk cache off and the in-memory store empty:
    hashing each file, reading, resizing/cropping, encoding, storing;
  * cache (disk, first): the same with disk_cache on, into an empty folder (adds the safetensors writes);
  * cache (disk, second): the node again on the same folder with the in-memory store emptied (as after a
    restart): every latent comes from disk. The VAE calls of this run are counted (target: none).

Printed ratios: cache images/s over direct images/s (target >= 0.9) and the second disk run's time over the
first's (target < 5%). Nothing here asserts a timing; read the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import log, machine_busy_seconds  # noqa: E402


def comfy_in_process(root: Path, cpu: bool):
    """tests/conftest.py's ComfyInProcess (pytest is only imported, never run), on the CPU unless not ``cpu``."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: E402

    comfyui = conftest.read_kiln_env().get("KILN_COMFYUI")
    if not comfyui or not (Path(comfyui) / "main.py").is_file():
        sys.exit("ComfyUI is not provisioned (KILN_COMFYUI unset or has no main.py): run 'bash scripts/provision.sh'")
    conftest.FORCE_CPU = cpu
    return conftest.ComfyInProcess(root, Path(comfyui))


PATHS = ("direct", "cache_memory", "cache_disk_first", "cache_disk_second")


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` captioned images of size² pixels: gradient background + shapes, JPEG and PNG alternating."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        t = (xx * rng.random() + yy * rng.random())[..., None] / 2
        arr = (c0 * (1 - t) + c1 * t + rng.normal(0, 6, (size, size, 3))).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 10, size // 4))]
            d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 255, 3).tolist()))
        stem = folder / f"img_{i:03d}"
        if i % 2:
            im.save(stem.with_suffix(".jpg"), quality=92)
        else:
            im.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(f"kiln bench image {i}")


def timed(fn) -> tuple[tuple[float, float, float], object]:
    """((wall seconds, this process's CPU seconds, cores' worth of CPU other processes used meanwhile), result).
    On a shared machine the CPU seconds are the steadier figure: other processes stretch wall time, not them."""
    import resource
    busy0, own0 = machine_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    return (wall, own, max(0.0, (machine_busy_seconds() - busy0 - own) / wall)), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256, help="image and training size (multiple of 64)")
    p.add_argument("--batch", type=int, default=4, help="images per VAE call (Cache Latents' batch_size)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each path; the best is reported")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI pick its device (default: forced to the CPU)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="kiln-cache-bench-"))
    comfy = comfy_in_process(work / "comfy", cpu=not args.gpu)
    from fixtures import tiny_models

    cache_dir = Path(os.environ.get("KILN_FIXTURE_CACHE") or REPO / ".kiln" / "fixtures")
    cache_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(tiny_models.build_sd1_checkpoint(str(cache_dir / tiny_models.default_name("sd1"))))
    (comfy.checkpoints_dir / ckpt.name).symlink_to(ckpt)
    make_images(work / "images" / "1_bench", args.images, args.resolution)
    _, _, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=ckpt.name)
    res = args.resolution
    ds = comfy.run_node("KilnLoadDataset", folder=str(work / "images"), caption_extension=".txt", class_tokens="",
                        repeats=1, resolution=res, batch_size=1, enable_bucket=False, min_bucket_reso=res,
                        max_bucket_reso=res, bucket_reso_steps=64, bucket_no_upscale=False)[0]
    nodes_mod = sys.modules[comfy.node_class("KilnCacheLatents").__module__]
    cache_mod = sys.modules[nodes_mod.__name__.rsplit(".", 2)[0] + ".trainer_core.data.cache"]

    # the direct path's input: exactly the pixels Cache Latents feeds the VAE, batched the same way
    items = ds.dataset.items
    pixels = [cache_mod.load_pixels(it.path, it.bucket, ds.dataset.subsets[it.subset])[0] for it in items]
    batches = [torch.stack(pixels[b:b + args.batch]).permute(0, 2, 3, 1).contiguous()
               for b in range(0, len(pixels), args.batch)]

    calls = {"n": 0}
    original_encode = vae.encode

    def counting(px, *a, **kw):
        calls["n"] += 1
        return original_encode(px, *a, **kw)
    vae.encode = counting

    def direct():
        with torch.inference_mode():
            return [vae.encode(b) for b in batches]

    def node(disk: bool, folder: Path | None = None):
        nodes_mod.MEMORY.clear()
        kw = dict(disk_cache=True, cache_folder=str(folder)) if disk else {}
        return comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=args.batch, **kw)[0]

    log(f"{args.images} images of {res}x{res}, batch {args.batch}, device {vae.device}, "
        f"threads {torch.get_num_threads()}; warming up")
    direct()
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in PATHS}
    second_calls = []
    for r in range(args.repeats):
        runs["direct"].append(timed(direct)[0])
        runs["cache_memory"].append(timed(lambda: node(False))[0])
        folder = work / f"disk_{r}"
        runs["cache_disk_first"].append(timed(lambda: node(True, folder))[0])
        before = calls["n"]
        measured, out = timed(lambda: node(True, folder))
        runs["cache_disk_second"].append(measured)
        second_calls.append(calls["n"] - before)
        if out.cache.stats.from_disk != len(items):
            raise RuntimeError(f"the second disk run did not come from disk: {out.cache.stats}")
        log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.3f} s ({v[-1][1]:.3f} s CPU)" for k, v in runs.items()))

    n = len(items)
    wall = {k: min(m[0] for m in v) for k, v in runs.items()}
    cpu = {k: min(m[1] for m in v) for k, v in runs.items()}
    result = {
        "images": n, "resolution": res, "batch": args.batch, "device": str(vae.device),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "wall_seconds_best": wall, "cpu_seconds_best": cpu,
        "runs": {k: [dict(zip(("wall_s", "cpu_s", "other_load_cores"), m)) for m in v] for k, v in runs.items()},
        "images_per_s": {k: n / wall[k] for k in PATHS[:3]},
        "ratio_cache_memory_over_direct": wall["direct"] / wall["cache_memory"],
        "ratio_cache_disk_first_over_direct": wall["direct"] / wall["cache_disk_first"],
        "ratio_cache_memory_over_direct_cpu": cpu["direct"] / cpu["cache_memory"],
        "ratio_cache_disk_first_over_direct_cpu": cpu["direct"] / cpu["cache_disk_first"],
        "ratio_second_over_first_disk_run": wall["cache_disk_second"] / wall["cache_disk_first"],
        "ratio_second_over_first_disk_run_cpu": cpu["cache_disk_second"] / cpu["cache_disk_first"],
        "vae_calls_in_second_runs": second_calls,
    }
    other = {k: statistics.median(m[2] for m in v) for k, v in runs.items()}

    def row(label, k, ratio=None, target=""):
        text = f"  {label:<27}{n / wall[k]:8.2f} images/s  wall {wall[k]:7.3f} s  CPU {cpu[k]:7.3f} s"
        if ratio:
            text += (f"   ratio {result[ratio]:.2f} (CPU time: {result[ratio + '_cpu']:.2f}){target}")
        return text
    lines = [
        f"Cache Latents throughput ({n} images {res}x{res}, batch {args.batch}, {result['device']}, "
        f"{result['threads']} threads, best of {args.repeats}; ratios are images/s of Cache Latents / direct)",
        row("direct vae.encode", "direct"),
        row("Cache Latents (memory)", "cache_memory", "ratio_cache_memory_over_direct", "  target >= 0.9"),
        row("Cache Latents (disk, 1st)", "cache_disk_first", "ratio_cache_disk_first_over_direct", "  target >= 0.9"),
        f"  Cache Latents (disk, 2nd)  wall {wall['cache_disk_second']:.3f} s = "
        f"{100 * result['ratio_second_over_first_disk_run']:.1f}% of the first disk run (CPU time: "
        f"{100 * result['ratio_second_over_first_disk_run_cpu']:.1f}%; target < 5%); VAE calls: {second_calls}",
        "  other processes' load during each path (cores, median): "
        + ", ".join(f"{k} {v:.2f}" for k, v in other.items()),
    ]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
