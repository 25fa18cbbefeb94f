"""A folder of generated images that knows how it was made (Make Regularization Images): a manifest records the
settings and each file's seed, so a second run with the same model, prompt, count and seeds generates nothing,
a larger count generates only the new images, and other settings generate the set again.
"""
from __future__ import annotations

import json
import os

from ..files.atomic import write_atomically

MANIFEST = "kiln_generated.json"


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def read_manifest(folder: str) -> dict:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def plan(folder: str, settings: dict, count: int, seed: int) -> tuple[list[tuple[str, int]], list[str]]:
    """(to generate: [(file name, seed)], to remove: files of this manifest beyond ``count``). An image is kept
    when the manifest's settings equal ``settings``, it was made with the same seed, and its file and caption
    are there."""
    manifest = read_manifest(folder)
    same = manifest.get("settings") == settings
    made = manifest.get("images", {}) if same else {}
    todo = []
    for i in range(count):
        name = image_name(i)
        there = os.path.isfile(os.path.join(folder, name)) and os.path.isfile(os.path.join(folder, caption_of(name)))
        if not (there and made.get(name) == seed + i):
            todo.append((name, seed + i))
    wanted = {image_name(i) for i in range(count)}
    stale = sorted(n for n in manifest.get("images", {}) if n not in wanted)
    return todo, stale


def caption_of(name: str) -> str:
    return os.path.splitext(name)[0] + ".txt"


def write_manifest(folder: str, settings: dict, images: dict[str, int]) -> None:
    text = json.dumps({"settings": settings, "images": dict(sorted(images.items()))}, indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically(os.path.join(folder, MANIFEST), write, "the generated images' manifest",
                     "Free disk space or choose another folder.")
