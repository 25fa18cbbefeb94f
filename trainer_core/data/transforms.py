"""One geometry for an image and its mask: resize to cover the bucket, then crop (and flip).

Both go through the same function with the same numbers, so a mask stays pixel-aligned with its
image (kohya stretches the mask while it crops the image; we do not).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Geometry:
    original_size: tuple[int, int]   # (w, h) of the file
    resized: tuple[int, int]         # (w, h) after the cover-resize
    crop_left: int
    crop_top: int
    bucket: tuple[int, int]          # (w, h) trained at
    flip: bool = False


def plan_geometry(size: tuple[int, int], bucket: tuple[int, int], flip: bool = False,
                  crop_offset: tuple[float, float] = (0.5, 0.5)) -> Geometry:
    """crop_offset in [0,1]² picks the crop window (0.5, 0.5 = centre; random_crop draws it)."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left = int(round((rw - bw) * crop_offset[0]))
    top = int(round((rh - bh) * crop_offset[1]))
    return Geometry((w, h), (rw, rh), left, top, (bw, bh), flip)


def apply_geometry(im: Image.Image, g: Geometry, resample=Image.Resampling.LANCZOS) -> Image.Image:
    if im.size != g.original_size:
        im = im.resize(g.original_size, Image.Resampling.BILINEAR)
    im = im.resize(g.resized, resample)
    im = im.crop((g.crop_left, g.crop_top, g.crop_left + g.bucket[0], g.crop_top + g.bucket[1]))
    if g.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


def to_tensor(im: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1] (greyscale -> 1HW)."""
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float() / 255.0
    return a.permute(2, 0, 1) if a.dim() == 3 else a[None]
