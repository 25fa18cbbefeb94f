"""The training loop refuses to report success for training that changes nothing, and a resume with changed
settings applies them and says so (or refuses a different optimizer) (issue 17, items 2 and 13)."""
import io

import pytest
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.transforms import Geometry
from trainer_core.errors import KilnError
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig, train

G = Geometry((16, 16), (16, 16), 0, 0, (16, 16))


def cache(masks=None, n=4):
    gen = torch.Generator().manual_seed(0)
    masks = masks or [None] * n
    return LatentCache([CachedSample(torch.randn(4, 2, 2, generator=gen), m, f"c{k}", 1, False, G, f"{k}.png")
                        for k, m in enumerate(masks)], dataset=None, encoder_id="t")


def run(cfg, data=None, dead_output=False, resume=None, weights=None, lrs=None):
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 4, 1))
    net = LoRANetwork(root, [TargetRule(r"0", ("conv1x1",), 2, 2.0)], lambda p: f"lora_{p}", seed=1)
    if weights is not None:
        net.load_kohya_state_dict(weights)
    saved = {}

    def forward(x, t, c):
        out = root(x)
        return out * 0 if dead_output else out

    def on_save(step, state, result):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        saved[step] = (torch.load(buf, weights_only=True), net.kohya_state_dict())

    seen = [] if lrs is None else lrs
    with net.attached():
        result = train(net, SD1Objective(torch.linspace(0.99, 0.01, 100)), forward,
                       lambda caps, train=False, geometries=None: {}, data or cache(), lambda z: z, cfg,
                       torch.device("cpu"), on_step=lambda info: seen.append(info.lr), on_save=on_save, resume=resume)
    return result, saved, net.kohya_state_dict()


def test_all_zero_gradients_at_the_first_step_are_an_error_naming_the_causes():
    with pytest.raises(KilnError) as e:
        run(TrainConfig(steps=3, learning_rate=1e-2), dead_output=True)
    assert "step 1" in str(e.value) and "gradient" in str(e.value)
    assert all(w in str(e.value) for w in ("does not depend on its input", "learning rate of 0", "all black"))


def test_a_learning_rate_of_zero_stops_after_the_first_step():
    steps = []
    with pytest.raises(KilnError, match="first step changed no LoRA weight"):
        run(TrainConfig(steps=50, learning_rate=0.0), lrs=steps)
    assert steps == []  # stopped before reporting a single step


def test_all_black_masks_are_refused_before_training():
    black = torch.zeros(1, 2, 2)
    with pytest.raises(KilnError, match="every mask is entirely black"):
        run(TrainConfig(steps=2, learning_rate=1e-2), cache([black] * 4))


def test_one_black_mask_in_the_first_batch_is_not_mistaken_for_a_dead_model():
    masks = [torch.zeros(1, 2, 2)] + [torch.ones(1, 2, 2)] * 3
    result, _, _ = run(TrainConfig(steps=6, learning_rate=1e-2, seed=3), cache(masks))
    assert result.steps == 6


def test_a_lora_left_bit_identical_at_the_end_is_an_error():
    # under fp16 the step-1 check is off (a GradScaler may skip a step on overflow), so lr 0 is caught at the end
    with pytest.raises(KilnError, match="bit-identical to its starting state"):
        run(TrainConfig(steps=2, learning_rate=0.0, precision="fp16"))


CFG = dict(steps=8, learning_rate=2e-3, lr_scheduler="cosine", warmup_steps=2, seed=4, save_every=4)


def test_resume_with_a_changed_learning_rate_runs_at_the_new_rate_and_says_so():
    full_lrs = []
    _, saved, _ = run(TrainConfig(**CFG), lrs=full_lrs)
    state, weights = saved[4]
    lrs = []
    result, _, _ = run(TrainConfig(**{**CFG, "learning_rate": 1e-5}), resume=state, weights=weights, lrs=lrs)
    # the same point of the same cosine schedule, at the new base rate: 1e-5 / 2e-3 of the old values
    assert lrs == pytest.approx([x * (1e-5 / 2e-3) for x in full_lrs[4:]], rel=1e-9)
    note = " ".join(result.notes)
    assert "learning_rate 0.002 → 1e-05" in note and "no longer exactly" in note


def test_resume_with_changed_steps_and_schedule_takes_effect():
    _, saved, _ = run(TrainConfig(**CFG))
    state, weights = saved[4]
    lrs = []
    result, _, _ = run(TrainConfig(**{**CFG, "steps": 10, "lr_scheduler": "constant"}), resume=state, weights=weights,
                       lrs=lrs)
    assert result.steps == 10 and lrs == [2e-3] * 6
    assert "steps 8 → 10" in result.notes[0] and "lr_scheduler 'cosine' → 'constant'" in result.notes[0]


def test_resume_with_unchanged_settings_has_no_note():
    _, saved, full = run(TrainConfig(**CFG))
    result, _, resumed = run(TrainConfig(**CFG), resume=saved[4][0], weights=saved[4][1])
    assert result.notes == ["resuming exactly at step 4"] and all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_with_another_optimizer_is_refused_with_the_reason():
    _, saved, _ = run(TrainConfig(**CFG))
    with pytest.raises(KilnError) as e:
        run(TrainConfig(**{**CFG, "optimizer": "SGD"}), resume=saved[4][0], weights=saved[4][1])
    assert "AdamW" in str(e.value) and "SGD" in str(e.value) and "optimizer" in str(e.value)
