"""Out of memory during training (trainer_core/memory/oom.py): torch's own OutOfMemoryError raised inside a step stops
the run with a KilnError that says where, with the figures and the settings that apply; the adapters come off the
host network and the intermediate save made before it is kept."""
import pytest
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.transforms import Geometry
from trainer_core.errors import KilnError
from trainer_core.families.sd1 import SD1Objective
from trainer_core.training.loop import TrainConfig, train
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.memory.oom import advice


def test_an_oom_in_a_step_becomes_advice_and_leaves_the_host_and_the_last_save():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        before = root(x)
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: f"lora_{p}", seed=1)
    calls, saved = [], {}

    def forward(x_t, t, c):
        calls.append(len(calls))
        if len(calls) == 4:  # probe (1), step 1 (2), step 2 (3), step 3 (4): what a CUDA allocator raises
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return root(x_t)

    g = Geometry((32, 32), (32, 32), 0, 0, (32, 32))
    samples = [CachedSample(torch.randn(4, 4, 4), None, "a", 1, False, g, f"{k}.png") for k in range(4)]
    cfg = TrainConfig(steps=5, batch_size=2, learning_rate=1e-2, save_every=2, precision="fp32")
    with pytest.raises(KilnError) as err:
        with network.attached():
            train(network, SD1Objective(torch.linspace(0.99, 0.01, 100)), forward,
                  lambda caps, train=False, geometries=None: {}, LatentCache(samples, None, "t"), lambda z: z, cfg,
                  torch.device("cpu"), on_save=lambda step, state, result, epoch=None: saved.update({step: state}))
    text = str(err.value)
    assert "out of memory at training step 3" in text and "Tried to allocate 2.00 GiB" in text
    assert "batch_size (now 2" in text and "gradient_checkpointing on" in text and "AdamW8bit" in text
    assert list(saved) == [2]  # the save before the error is there
    with torch.no_grad():
        assert torch.equal(root(x), before)  # adapters off the host network


def test_advice_names_only_what_applies():
    cfg = TrainConfig(batch_size=1, gradient_checkpointing=True, optimizer="AdamW8bit", ema_decay=0.99,
                      precision="bf16")
    tips = " ".join(advice(cfg, 2 ** 28, torch.device("cuda")))
    assert "batch_size" not in tips and "gradient_checkpointing" not in tips and "AdamW8bit" not in tips
    assert "ema_on_host=true (the EMA holds 1.00 GiB" in tips and "precision bf16" not in tips
