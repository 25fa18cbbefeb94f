"""kohya's validation loss (sd-scripts ≥ 0.10): images held out by validation_split, scored on fixed timesteps
and fixed noise, so two evaluations of the same weights give the same number.

Split (kohya's split_train_val, per subset): the subset's images in path order, shuffled with
validation_seed; training keeps the first ⌈n·(1 − split)⌉, validation gets the rest (kohya's validation part,
n − round(n·split) onwards, can overlap the training part when rounding meets; here it never does: held-out
images are never trained on). Regularization images stay in training, balanced again against what is left.
Scoring: every validation batch at the timesteps linspace(min, max, 6)[1:-1] (200, 400, 600, 800 for the
full range), noise drawn from a generator seeded with validation_seed each time.
A dataset TOML's [[datasets]] block (or [general]) may set its own validation_split / validation_seed: as in
kohya they override the training's for that block's subsets (the noise seed stays the training's).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import replace

from ..data.cache import LatentCache
from ..errors import KilnError

NUM_TIMESTEPS = 4


def split(cache: LatentCache, fraction: float | None, seed: int) -> tuple[LatentCache, LatentCache | None]:
    """(training part, validation part or None when nothing is held out)."""
    own = {sub.block: (sub.validation_split, sub.validation_seed)
           for sub in (cache.dataset.subsets if cache.dataset is not None else [])}
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(cache.samples):
        if not s.is_reg:
            groups.setdefault((s.block, os.path.dirname(s.path)), []).append(i)
    held, asked = [], set()
    for (block, _), members in groups.items():
        block_fraction, block_seed = own.get(block, (None, None))
        f = fraction if block_fraction is None else block_fraction
        if not f:
            continue
        asked.add(f"{f:g}")
        members = sorted(members, key=lambda i: cache.samples[i].path)
        random.Random(seed if block_seed is None else block_seed).shuffle(members)
        held += members[math.ceil(len(members) * (1 - f)):]
    if not asked:
        return cache, None
    what = f"validation_split {'/'.join(sorted(asked))}"
    if not held:
        raise KilnError(f"{what} holds out no image (too few per folder); raise it or leave it at 0.")
    if len(held) == sum(1 for s in cache.samples if not s.is_reg):
        raise KilnError(f"{what} holds out every training image; lower it.")
    held_set = frozenset(held)
    repeats = ([s.repeats for s in cache.samples] if cache.dataset is None or
               len(cache.dataset.items) != len(cache.samples) else cache.dataset.sample_repeats(held_set))
    train = [replace(s, repeats=repeats[i]) for i, s in enumerate(cache.samples) if i not in held_set]
    val = [replace(s, repeats=1) for i, s in enumerate(cache.samples) if i in held_set]
    return replace(cache, samples=train), replace(cache, samples=val)


def timesteps(min_timestep: int | None, max_timestep: int | None, num_timesteps: int = 1000) -> list[int]:
    """kohya's validation timesteps: np.linspace(min, max, 6, dtype=int)[1:-1]."""
    lo = min_timestep or 0
    hi = num_timesteps if max_timestep is None else max_timestep
    return [int(lo + (hi - lo) * k / (NUM_TIMESTEPS + 1)) for k in range(1, NUM_TIMESTEPS + 1)]


def batches(cache: LatentCache, batch_size: int, max_steps: int | None) -> list[list[int]]:
    """Validation batches in a fixed order (per bucket, by path), at most max_validation_steps of them."""
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(cache.samples):
        by_shape.setdefault((s.block, tuple(s.latent.shape)), []).append(i)
    out = []
    for key in sorted(by_shape):
        idx = sorted(by_shape[key], key=lambda i: cache.samples[i].path)
        n = cache.samples[idx[0]].batch_size or batch_size
        out += [idx[b:b + n] for b in range(0, len(idx), n)]
    return out if max_steps is None else out[:max_steps]


def parts(cache: LatentCache, cfg) -> tuple[LatentCache, LatentCache | None]:
    """The training and validation parts for a TrainConfig (validation_seed defaults to the seed, as kohya)."""
    val = cfg.validation
    return split(cache, val.validation_split, cfg.seed if val.validation_seed is None else val.validation_seed)
