"""kohya's validation loss: the split (per folder, seeded, never overlapping), reg images rebalanced against
what is left, the fixed timesteps, and in the loop: held-out images never trained on, the same weights give
the same validation loss, and the curve is reported per step."""
import os
from dataclasses import replace

import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.buckets import BucketConfig
from trainer_core.data.dataset import Dataset, ImageItem, Subset
from trainer_core.data.transforms import plan_geometry
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig, train
from trainer_core.training.validation import split, timesteps


def sample(path, is_reg=False, repeats=1):
    g = plan_geometry((32, 32), (32, 32))
    seed = sum(map(ord, path))
    return CachedSample(torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(seed)), None, path, repeats,
                        is_reg, g, path)


def folders():
    return LatentCache([sample(f"/d/a/{i}.png") for i in range(5)] + [sample(f"/d/b/{i}.png") for i in range(3)]
                       + [sample("/d/reg/0.png", is_reg=True)], None, "x")


def test_split_per_folder_is_seeded_and_never_overlaps():
    train_part, val = split(folders(), 0.2, seed=1)
    held = {s.path for s in val.samples}
    kept = {s.path for s in train_part.samples}
    # folder a: ⌈5·0.8⌉ = 4 train, 1 held; folder b: ⌈3·0.8⌉ = 3 train, none held; reg always trains
    assert len([p for p in held if "/a/" in p]) == 1 and not [p for p in held if "/b/" in p]
    assert not held & kept and "/d/reg/0.png" in kept and len(kept) + len(held) == 9
    assert split(folders(), 0.2, seed=1)[1].samples[0].path == val.samples[0].path
    assert {s.path for s in split(folders(), 0.4, seed=1)[1].samples} >= held  # a larger split holds more
    whole = folders()
    assert split(whole, None, 1) == (whole, None)


def test_a_datasets_blocks_own_split_and_seed_override_the_trainings():
    """kohya: a [[datasets]] block's validation_split / validation_seed win over the training's for its subsets."""
    def blocks(own_split, own_seed):
        subsets = [Subset("/d/a", 1, block=0), Subset("/d/b", 1, block=1, validation_split=own_split,
                                                        validation_seed=own_seed)]
        samples = [replace(sample(f"/d/a/{i}.png"), block=0) for i in range(4)] + \
                  [replace(sample(f"/d/b/{i}.png"), block=1) for i in range(4)]
        items = [ImageItem(s.path, "c", (32, 32), (32, 32), s.block) for s in samples]
        return LatentCache(samples, Dataset(subsets, items, BucketConfig()), "x")

    def held(cache, fraction, seed):
        return sorted(s.path for s in split(cache, fraction, seed)[1].samples)

    # no training split: only block 1 holds out, ⌈4·0.5⌉ = 2 of 4 kept, shuffled with its own seed 7
    only_b = held(blocks(0.5, 7), None, 1)
    import random
    order = sorted(f"/d/b/{i}.png" for i in range(4))
    random.Random(7).shuffle(order)
    assert only_b == sorted(order[2:])
    assert held(blocks(0.5, 7), None, 99) == only_b  # the training's seed does not move it
    # a training split applies to block 0 only; block 1 keeps its own 0.5
    both = held(blocks(0.5, 7), 0.25, 1)
    assert len([p for p in both if "/a/" in p]) == 1 and [p for p in both if "/b/" in p] == only_b
    # a block whose own split is 0 holds nothing out even when the training asks for one
    assert [p for p in held(blocks(0.0, None), 0.5, 1) if "/b/" in p] == []
    assert split(blocks(0.0, None), None, 1)[1] is None


def test_reg_images_are_balanced_against_the_training_images_left():
    subsets = [Subset("/d/a", 2), Subset("/d/reg", 1, is_reg=True)]
    items = [ImageItem(f"/d/a/{i}.png", "c", (32, 32), (32, 32), 0) for i in range(4)] + \
            [ImageItem("/d/reg/0.png", "c", (32, 32), (32, 32), 1)]
    ds = Dataset(subsets, items, BucketConfig())
    assert ds.sample_repeats() == [2, 2, 2, 2, 8]  # one reg image repeated up to the 8 training draws
    assert ds.sample_repeats(frozenset({0})) == [0, 2, 2, 2, 6]


def test_fixed_timesteps_follow_kohyas_linspace():
    assert timesteps(None, None) == [200, 400, 600, 800]
    assert timesteps(100, 900) == [260, 420, 580, 740]


def run(lr, seen, **options):
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: "lora_" + p.replace(".", "_"))

    def conditioning(caps, train=False, geometries=None):
        if train:
            seen.update(caps)
        return {}

    cfg = TrainConfig(steps=6, batch_size=2, learning_rate=lr, validation_split=0.2, validate_every_n_steps=2,
                      **options)
    with network.attached():
        return train(network, SD1Objective(torch.linspace(0.99, 0.01, 100)), lambda x, t, c: root(x), conditioning,
                     folders(), lambda z: z, cfg, torch.device("cpu"))


def test_loop_never_trains_on_held_out_images_and_scores_them_the_same_way_each_time():
    seen = set()
    # one step at lr 1e-2, then lr 0 (StepLR, gamma 0): the weights measured at steps 2, 4, 6 are the same
    frozen = run(1e-2, seen, lr_scheduler_type="torch.optim.lr_scheduler.StepLR",
                 lr_scheduler_args={"step_size": 1, "gamma": 0.0})
    held = {s.path for s in split(folders(), 0.2, seed=0)[1].samples}
    assert held and not held & seen
    steps = [s for s, _ in frozen.validation]
    assert steps[:3] == [2, 4, 6]
    values = {v for _, v in frozen.validation}
    assert len(values) == 1  # same weights: fixed timesteps and noise give the same number
    learning = run(1e-1, set())
    assert [v for _, v in learning.validation][0] != [v for _, v in learning.validation][-1]
