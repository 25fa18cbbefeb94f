"""kohya's epoch: repeats, same-bucket batches, and per-[[datasets]] batch sizes that never mix blocks."""
import random

import torch

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.transforms import plan_geometry
from trainer_core.training.loop import epoch_batches


def sample(i, shape, repeats=1, block=0, batch_size=0):
    g = plan_geometry((shape[2] * 8, shape[1] * 8), (shape[2] * 8, shape[1] * 8))
    return CachedSample(torch.zeros(shape), None, "c", repeats, False, g, f"img{i}", block=block, batch_size=batch_size)


def test_repeats_buckets_and_block_batch_sizes():
    samples = ([sample(i, (4, 8, 8), repeats=2, block=0, batch_size=2) for i in range(3)]       # 6 draws, batch 2
               + [sample(3 + i, (4, 8, 12), block=0, batch_size=2) for i in range(2)]            # other bucket
               + [sample(5 + i, (4, 8, 8), repeats=1, block=1, batch_size=4) for i in range(5)])  # same shape, block 1
    batches = epoch_batches(LatentCache(samples, None, "x"), batch_size=1, rng=random.Random(0))
    drawn = sorted(i for b in batches for i in b)
    assert drawn == sorted([0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9])  # every sample `repeats` times
    for b in batches:
        blocks = {samples[i].block for i in b}
        shapes = {tuple(samples[i].latent.shape) for i in b}
        assert len(blocks) == 1 and len(shapes) == 1, b  # never mixed
        assert len(b) <= (2 if 0 in blocks else 4)
    assert sorted(len(b) for b in batches if samples[b[0]].block == 1) == [1, 4]


def test_one_block_without_own_size_uses_the_training_batch_size():
    samples = [sample(i, (4, 8, 8)) for i in range(5)]
    batches = epoch_batches(LatentCache(samples, None, "x"), batch_size=2, rng=random.Random(1))
    assert sorted(len(b) for b in batches) == [1, 2, 2]
