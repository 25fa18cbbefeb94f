"""Aspect-ratio bucketing with kohya's parameters (resolution, min/max_bucket_reso, steps, no_upscale)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketConfig:
    resolution: tuple[int, int] = (512, 512)   # (width, height); its area is the bucket budget
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


def bucket_resolutions(cfg: BucketConfig) -> list[tuple[int, int]]:
    """All (w, h) with w, h multiples of the step, within [min, max], area <= resolution area."""
    area = cfg.resolution[0] * cfg.resolution[1]
    step = cfg.bucket_reso_steps
    out = set()
    w = cfg.min_bucket_reso
    while w <= cfg.max_bucket_reso:
        h = min(cfg.max_bucket_reso, (area // w) // step * step)
        if h >= cfg.min_bucket_reso:
            out.add((w, h))
            out.add((h, w))
        w += step
    side = int(math.sqrt(area)) // step * step
    out.add((side, side))
    return sorted(out)


def choose_bucket(size: tuple[int, int], cfg: BucketConfig, buckets: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The bucket (w, h) an image of ``size`` trains at."""
    w, h = size
    step = cfg.bucket_reso_steps
    if not cfg.enable_bucket:
        return cfg.resolution
    area = cfg.resolution[0] * cfg.resolution[1]
    if cfg.bucket_no_upscale and w * h <= area:
        # keep the image's own size, rounded down to the step (never upscaled)
        bw, bh = max(step, w // step * step), max(step, h // step * step)
        return bw, bh
    buckets = buckets or bucket_resolutions(cfg)
    ar = w / h
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(ar)), -b[0] * b[1]))
