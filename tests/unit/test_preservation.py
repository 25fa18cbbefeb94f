"""Differential output preservation (trainer_core/maths/preservation.py and loop.train): trigger → class pairs from
the dataset the kohya way or given, whole-word replacement, and a training run in which a large multiplier keeps
the class prompt's prediction measurably closer to the base network's than training without it."""
import pytest
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.dataset import Subset
from trainer_core.data.transforms import Geometry
from trainer_core.errors import KilnError
from trainer_core.families.sd1 import SD1Objective
from trainer_core.training.loop import TrainConfig, train
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.maths.preservation import pairs_from, preservation_caption


def test_pairs_come_from_folder_and_class_tokens_or_are_given():
    subsets = [Subset("/d/10_dog", 10, "sks dog"), Subset("/d/5_cat", 5, "cat"), Subset("/d/1_dog", 1, "dog", is_reg=True),
               Subset("/d/loose", 1, "zzz")]
    assert pairs_from(subsets) == [("sks dog", "dog")]  # cat: class_tokens = folder name, nothing to replace
    assert pairs_from(subsets, "ohwx", "man") == [("ohwx", "man")]
    with pytest.raises(KilnError, match="go together"):
        pairs_from(subsets, "ohwx", "")
    with pytest.raises(KilnError, match="name the image folder after the class"):
        pairs_from([Subset("/d/5_cat", 5, "cat")])


def test_the_trigger_is_replaced_as_whole_words_only():
    pairs = [("sks dog", "dog")]
    assert preservation_caption("a photo of sks dog, running", pairs) == "a photo of dog, running"
    assert preservation_caption("sks doggo", pairs) is None and preservation_caption("a cat", pairs) is None


def train_run(preserve: bool, multiplier: float = 50.0):
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 4, 4.0)], lambda p: f"lora_{p}", seed=1)
    words = {"sks": 1.0, "toy": 2.0}
    embed = {w: torch.randn(4, generator=torch.Generator().manual_seed(k)) for k, w in enumerate(words)}

    def conditioning(caps, train=False, geometries=None):  # a bag of word vectors per caption
        return {"context": torch.stack([sum((embed[w] for w in c.split() if w in embed), torch.zeros(4)) for c in caps])}

    def forward(x, t, c):
        return root(x + c["context"].view(-1, 4, 1, 1))

    g = Geometry((32, 32), (32, 32), 0, 0, (32, 32))
    gen = torch.Generator().manual_seed(0)
    samples = [CachedSample(torch.randn(4, 4, 4, generator=gen) + 2.0, None, "sks toy", 1, False, g, f"{k}.png")
               for k in range(4)]
    cfg = TrainConfig(steps=40, batch_size=2, seed=3, learning_rate=3e-2, diff_output_preservation=preserve,
                      diff_output_preservation_multiplier=multiplier, preservation_pairs=[("sks toy", "toy")])
    with network.attached():
        objective = SD1Objective(torch.linspace(0.99, 0.01, 100))
        train(network, objective, forward, conditioning, LatentCache(samples, dataset=None, encoder_id="t"),
              lambda z: z, cfg, torch.device("cpu"))
        x = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            network.eval()
            cls = conditioning(["toy"] * 8)
            trained = forward(x, None, cls)
            network.set_enabled(False)
            base = forward(x, None, cls)
            network.set_enabled(True)
            trigger_shift = (forward(x, None, conditioning(["sks toy"] * 8)) - base).abs().mean()
    return float((trained - base).pow(2).mean()), float(trigger_shift)


def test_a_large_multiplier_keeps_the_class_prompt_closer_to_the_base():
    drift_plain, _ = train_run(False)
    drift_kept, shift_kept = train_run(True)
    assert drift_plain > 0
    assert drift_kept < 0.5 * drift_plain, (drift_kept, drift_plain)
    assert shift_kept > 0  # the LoRA still learned something for the trigger prompt
