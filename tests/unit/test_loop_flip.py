"""flip_aug at train time (trainer_core/training/loop.py): each drawn sample uses its mirrored latent with
probability 0.5, reproducibly under the training seed; the probe batch is never mirrored."""
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.transforms import Geometry
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig, train


def cache(flippable: bool) -> LatentCache:
    g = Geometry((32, 32), (32, 32), 0, 0, (32, 32))
    samples = []
    for k in range(3):
        plain, mirrored = torch.zeros(4, 4, 4), torch.ones(4, 4, 4)
        mask, mask_mirrored = torch.ones(1, 4, 4), torch.full((1, 4, 4), 0.5)
        samples.append(CachedSample(plain, mask, f"c{k}", 1, False, g, f"{k}.png",
                                    flipped_latent=mirrored if flippable else None,
                                    flipped_mask=mask_mirrored if flippable else None))
    return LatentCache(samples, dataset=None, encoder_id="test")


def drawn(flippable: bool, seed: int, steps: int = 60) -> list[float]:
    """Mean of every x0 the loop builds, in order (0 = plain latent, 1 = mirrored)."""
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: f"lora_{p}")
    seen = []

    def latent_in(x):
        seen.extend(x.mean(dim=(1, 2, 3)).tolist())
        return x

    with network.attached():
        train(network, SD1Objective(torch.linspace(0.99, 0.01, 100)), lambda x, t, c: root(x),
              lambda caps, train=True, geometries=None: {"context": torch.zeros(len(caps), 1, 1)}, cache(flippable), latent_in,
              TrainConfig(steps=steps, batch_size=1, seed=seed, max_grad_norm=0.0), torch.device("cpu"))
    return seen


def test_flipped_latents_are_drawn_half_the_time_reproducibly():
    a = drawn(True, seed=3)
    probe_start, steps, probe_end = a[0], a[1:-1], a[-1]
    assert probe_start == 0.0 and probe_end == 0.0  # before/after are measured the same way: unflipped
    assert set(steps) == {0.0, 1.0} and 0.3 < sum(steps) / len(steps) < 0.7
    assert drawn(True, seed=3) == a                   # the same seed draws the same flips
    assert drawn(True, seed=4)[1:-1] != steps          # another seed, other flips
    assert set(drawn(False, seed=3)) == {0.0}          # no twin: never anything but the plain latent
