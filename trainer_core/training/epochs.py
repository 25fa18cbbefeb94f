"""kohya's epochs: what one epoch holds, the stream of batches over epochs, how many optimizer steps an epoch
takes, and which epoch/step saves are kept (save_last_n_epochs / save_last_n_steps remove older intermediate
files, as kohya's train_network does)."""
from __future__ import annotations

import math
import random
from collections import defaultdict

from . import distributed
from ..data.cache import LatentCache


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


class BatchStream:
    """(epoch, batch) forever; epochs count from 1, as kohya's (caption_dropout_every_n_epochs reads them).
    Its position (the epoch's starting RNG state and how far into the epoch) can be saved and restored, so a
    resumed run draws exactly the batches the uninterrupted one would have.

    Under torchrun every rank draws the same global batches of ``batch_size`` × world size (the same seed, the same
    epoch order) and trains on its ``share`` of each: the run is that of one process with the global batch."""

    def __init__(self, cache: LatentCache, batch_size: int, seed: int):
        self.cache, self.batch_size = cache, batch_size
        self.rng = random.Random(seed)
        self.epoch, self.pos, self.batches = 0, 0, []
        self.epoch_start = self.rng.getstate()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, list[int]]:
        self.left_in_epoch()
        self.pos += 1
        return self.epoch, self.batches[self.pos - 1]

    def left_in_epoch(self) -> int:
        """Batches still to come in the current epoch (a new epoch is started when the last one is done)."""
        if self.pos >= len(self.batches):
            self.epoch += 1
            self.epoch_start = self.rng.getstate()
            self.batches, self.pos = epoch_batches(self.cache, self.batch_size, self.rng), 0
        return len(self.batches) - self.pos

    @property
    def epoch_ended(self) -> bool:
        """The last batch drawn was its epoch's last."""
        return self.pos >= len(self.batches)

    @staticmethod
    def share(batch: list[int]) -> slice:
        """This rank's positions in a global batch (all of it in a single process)."""
        return distributed.share(len(batch))

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "rng": self.epoch_start}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.rng.setstate(state["rng"])
        self.batches = epoch_batches(self.cache, self.batch_size, self.rng) if self.epoch else []


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
