"""kohya's epoch arithmetic: batches per epoch, steps from max_train_epochs, which saves are removed, and the
loop's epoch boundaries (an optimizer step never spans two epochs)."""
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.transforms import plan_geometry
from trainer_core.training.epochs import (batches_per_epoch, epoch_save_to_remove, resolve_epochs, step_save_to_remove,
                                 steps_per_epoch)
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.events import planned_previews, planned_saves, preview_due
from trainer_core.training.loop import TrainConfig, train


def sample(i, shape=(4, 4, 4), repeats=1, is_reg=False):
    g = plan_geometry((shape[2] * 8, shape[1] * 8), (shape[2] * 8, shape[1] * 8))
    return CachedSample(torch.randn(shape, generator=torch.Generator().manual_seed(i)), None, "c", repeats, is_reg, g,
                        f"img{i}")


def test_batches_and_steps_per_epoch_as_kohya_counts():
    # 3 images × 2 repeats in one bucket + 1 image in another, batch 2: ⌈6/2⌉ + ⌈1/2⌉ = 4 batches
    cache = LatentCache([sample(i, repeats=2) for i in range(3)] + [sample(3, (4, 4, 8))], None, "x")
    assert batches_per_epoch(cache, 2) == 4
    assert steps_per_epoch(cache, 2, 3) == 2  # ⌈4/3⌉
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=3, max_train_epochs=5)
    resolve_epochs(cfg, cache)
    assert cfg.steps == 10


def test_removed_saves_follow_kohyas_rules():
    assert epoch_save_to_remove(6, 2, 2) == 2 and epoch_save_to_remove(4, 2, 2) is None
    assert step_save_to_remove(50, 10, 30) == 10  # kohya's own example: step 50 keeps 20..50
    assert step_save_to_remove(40, 10, 30) is None and step_save_to_remove(40, 10, None) is None


def test_steps_end_at_epoch_boundaries_and_epoch_saves():
    cache = LatentCache([sample(i) for i in range(5)], None, "x")  # batch 1: 5 batches, accum 2 -> 3 steps/epoch
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: f"lora_{p}")
    infos, saves = [], []
    cfg = TrainConfig(batch_size=1, grad_accum=2, max_train_epochs=3, save_every_n_epochs=1, learning_rate=1e-3)
    with network.attached():
        train(network, SD1Objective(torch.linspace(0.99, 0.01, 100)), lambda x, t, c: root(x),
              lambda caps, train=False, geometries=None: {}, cache, lambda z: z, cfg, torch.device("cpu"),
              on_step=infos.append, on_save=lambda step, state, result, epoch=None: saves.append((step, epoch)))
    assert cfg.steps == 9 and len(infos) == 9
    assert [(i.step, i.epoch) for i in infos if i.epoch_end] == [(3, 1), (6, 2), (9, 3)]
    assert saves == [(3, 1), (6, 2)]  # not after the last epoch: the node's output is the final LoRA
    # the node's clock plans the same saves and previews ahead, by the loop's own rules
    assert planned_saves(cfg, 3) == [3, 6]
    assert planned_previews(cfg, 0, 3) == [] and planned_previews(cfg, 4, 3) == [4, 8]
    cfg.samples.sample_every_n_epochs = 1
    assert planned_previews(cfg, 4, 3) == [i.step for i in infos if preview_due(cfg, 4, i.step, i.epoch, i.epoch_end)]
    assert planned_previews(cfg, 4, 3) == [3, 6]  # kohya: the epoch option overrides the step one; none after the last


def test_planned_step_saves_include_the_last_step_with_epoch_saves_beside():
    cfg = TrainConfig(steps=12, save_every=4, save_every_n_epochs=2, learning_rate=1e-3)
    assert planned_saves(cfg, 5) == [4, 8, 10, 12]  # epochs end at 5, 10 (12 ends the 3rd and last: the output)
