"""kohya's epochs: what one epoch holds, how many optimizer steps it takes, and which epoch/step saves are
kept (save_last_n_epochs / save_last_n_steps remove older intermediate files, as kohya's train_network does)."""
from __future__ import annotations

import math
import random
from collections import defaultdict

from . import distributed
from .cache import LatentCache


def _buckets(cache: LatentCache, batch_size: int, world: int | None = None) -> dict[tuple, tuple[list[int], int]]:
    """(block, latent shape) -> (every sample index ``repeats`` times, that block's batch size). Reg images
    arrive already balanced against the training images (Dataset.sample_repeats, as kohya). Batch sizes are per
    process: with ``world`` processes (default: the running process group's size) a batch holds ``world`` times
    as many, which the ranks then share (distributed.share)."""
    world = distributed.world() if world is None else world
    draws, size = defaultdict(list), {}
    for i, s in enumerate(cache.samples):
        key = (s.block, tuple(s.latent.shape))
        draws[key].extend([i] * s.repeats)
        size[key] = (s.batch_size or batch_size) * world
    return {k: (draws[k], size[k]) for k in sorted(draws)}


def epoch_batches(cache: LatentCache, batch_size: int, rng: random.Random, world: int | None = None) -> list[list[int]]:
    """kohya's epoch: every sample ``repeats`` times, batches never mix buckets nor [[datasets]] blocks (each
    block batched by its own batch_size), batch order shuffled. Every rank draws the same global batches."""
    batches = []
    for idx, n in _buckets(cache, batch_size, world).values():
        idx = list(idx)
        rng.shuffle(idx)
        batches += [idx[b:b + n] for b in range(0, len(idx), n)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(cache: LatentCache, batch_size: int, world: int | None = None) -> int:
    """kohya's len(train_dataloader): Σ over buckets of ⌈draws / (batch size · processes)⌉."""
    return sum(math.ceil(len(idx) / n) for idx, n in _buckets(cache, batch_size, world).values())


def steps_per_epoch(cache: LatentCache, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: ⌈batches / gradient_accumulation_steps⌉ (kohya's num_update_steps_per_epoch)."""
    return math.ceil(batches_per_epoch(cache, batch_size) / grad_accum)


def resolve_epochs(cfg, cache: LatentCache) -> None:
    """max_train_epochs overrides the step count, as in kohya: epochs × steps per epoch (``cache``: the
    training part, validation images held out)."""
    if cfg.max_train_epochs:
        cfg.steps = cfg.max_train_epochs * steps_per_epoch(cache, cfg.batch_size, cfg.grad_accum)


def epoch_save_to_remove(epoch: int, every: int, last_n: int | None) -> int | None:
    """kohya's get_remove_epoch_no: saving at ``epoch`` removes the save of epoch − every·last_n (if ≥ 1)."""
    if not last_n:
        return None
    old = epoch - every * last_n
    return old if old >= 1 else None


def step_save_to_remove(step: int, every: int, last_n: int | None) -> int | None:
    """kohya's get_remove_step_no: saves older than the last ``last_n`` steps go; saving at ``step`` removes
    the multiple of ``every`` at or below step − last_n − 1 (every=10, last_n=30: step 50 removes step 10)."""
    if not last_n:
        return None
    old = step - last_n - 1
    old -= old % every
    return old if old >= 1 else None
