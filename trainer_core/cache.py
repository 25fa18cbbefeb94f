"""Latent cache: every image (and its mask) encoded once, grouped by bucket, kept in memory.

``encode`` is the host's VAE as a function of BCHW pixels in [0, 1]; latents are stored exactly as
it returns them (the family applies the model's latent scaling at train time).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .data.captions import CaptionOptions
from .data.dataset import Dataset
from .data.images import open_image
from .data.masks import image_rgb, load_mask
from .data.transforms import Geometry, apply_geometry, plan_geometry, to_tensor
from .errors import KilnError


@dataclass
class CachedSample:
    latent: torch.Tensor              # [C, h, w], float32, CPU
    mask: torch.Tensor | None         # [1, h, w] in [0, 1] at latent size, or None
    caption: str
    repeats: int
    is_reg: bool
    geometry: Geometry
    path: str
    captions: CaptionOptions = CaptionOptions()  # its subset's augmentation, applied each time it is drawn


@dataclass
class LatentCache:
    samples: list[CachedSample]
    dataset: Dataset
    encoder_id: str
    seconds: float = 0.0

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)


def load_pixels(path: str, bucket, subset, flip: bool = False):
    """(CHW pixels in [0,1], 1HW mask or None, geometry) with the mask cropped exactly like the image."""
    image = open_image(path)
    mask = load_mask(path, image, subset.mask_mode, subset.mask_dir, subset.missing_mask_is_white)
    g = plan_geometry(image.size, bucket, flip)
    pixels = to_tensor(apply_geometry(image_rgb(image), g))
    m = to_tensor(apply_geometry(mask, g)) if mask is not None else None
    return pixels, m, g


def latent_mask(mask: torch.Tensor, size, dilation: int = 0) -> torch.Tensor:
    """1HW pixel mask -> latent size by area averaging, then optionally grown by ``dilation`` latent pixels."""
    m = F.interpolate(mask[None], size=tuple(size), mode="area")
    if dilation > 0:
        m = F.max_pool2d(m, 2 * dilation + 1, stride=1, padding=dilation)
    return m[0]


def encode_dataset(dataset: Dataset, encode: Callable[[torch.Tensor], torch.Tensor], encoder_id: str,
                   batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> LatentCache:
    """Encode all images in same-bucket batches; masks are reduced to latent size by area averaging."""
    start = time.perf_counter()
    by_bucket = defaultdict(list)
    for idx, item in enumerate(dataset.items):
        by_bucket[item.bucket].append(idx)
    samples: list[CachedSample | None] = [None] * len(dataset.items)
    repeats = dataset.sample_repeats()
    done, total = 0, len(dataset.items)
    for bucket, indices in by_bucket.items():
        for b in range(0, len(indices), batch_size):
            chunk = indices[b:b + batch_size]
            loaded = [load_pixels(dataset.items[i].path, bucket, dataset.subsets[dataset.items[i].subset]) for i in chunk]
            with torch.no_grad():
                latents = encode(torch.stack([p for p, _, _ in loaded])).float().cpu()
            if not torch.isfinite(latents).all():
                raise KilnError(f"the VAE returned NaN/inf latents for {dataset.items[chunk[0]].path} "
                                f"(batch of {len(chunk)}): try the VAE in fp32.")
            for i, (_, mask, g), lat in zip(chunk, loaded, latents):
                item = dataset.items[i]
                subset = dataset.subsets[item.subset]
                m = latent_mask(mask, lat.shape[-2:], subset.mask_dilation) if mask is not None else None
                samples[i] = CachedSample(lat, m, item.caption, repeats[i], subset.is_reg, g, item.path,
                                          subset.captions)
            done += len(chunk)
            if progress:
                progress(done, total)
    return LatentCache(samples, dataset, encoder_id, time.perf_counter() - start)
