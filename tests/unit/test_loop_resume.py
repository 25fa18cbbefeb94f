"""Save every N steps and resume (trainer_core/training/loop.py): a run resumed from the state and adapters saved at
step k ends bit-identical to the uninterrupted run, with flips, caption augmentation, LoRA dropout and more
batches than one epoch in play; the state survives torch.save / torch.load(weights_only=True)."""
import io

import pytest
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.captions import CaptionOptions
from trainer_core.data.transforms import Geometry
from trainer_core.errors import KilnError
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.training.config import NoiseConfig
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig, train

CFG = dict(steps=9, batch_size=2, seed=5, learning_rate=1e-2, lr_scheduler="cosine", warmup_steps=2)


def data() -> LatentCache:
    g = Geometry((32, 32), (32, 32), 0, 0, (32, 32))
    gen = torch.Generator().manual_seed(0)
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3)
    samples = [CachedSample(torch.randn(4, 4, 4, generator=gen), None, f"a{k}, b{k}, c{k}", 1 + k % 2, False, g,
                            f"{k}.png", opts, flipped_latent=torch.randn(4, 4, 4, generator=gen)) for k in range(5)]
    return LatentCache(samples, dataset=None, encoder_id="test")


def run(resume=None, weights=None, save_every=0, options=None, noise=NoiseConfig(), algorithm="lora"):
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: f"lora_{p}", dropout=0.2, seed=1,
                          algorithm=algorithm)
    if weights is not None:
        network.load_kohya_state_dict(weights)
    saved = {}
    captions = []

    def conditioning(caps, train=False, geometries=None):
        captions.extend(caps)
        return {"context": torch.tensor([[float(len(c))] for c in caps])}

    def forward(x, t, c):
        return root(x) * (1 + c["context"].view(-1, 1, 1, 1) / 100)

    def on_save(step, state, result, epoch=None):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        saved[step] = (torch.load(buf, weights_only=True), network.kohya_state_dict(), epoch)

    with network.attached():
        objective = SD1Objective(torch.linspace(0.99, 0.01, 100), noise=noise, min_timestep=10, max_timestep=90)
        result = train(network, objective, forward, conditioning, data(),
                       lambda z: z, TrainConfig(**{**CFG, **(options or {})}, save_every=save_every), torch.device("cpu"),
                       on_save=on_save, resume=resume)
    return network.kohya_state_dict(), result, saved, captions


def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one():
    full, full_result, saved, _ = run(save_every=4)
    full, full_result, saved, _ = run(save_every=3)
    assert sorted(saved) == [3, 6, 9]  # the last step too, as kohya (NAME-step00000009 beside the output)
    full, full_result, saved, _ = run(save_every=4)
    assert sorted(saved) == [4, 8]
    state, weights, _ = saved[4]
    resumed, result, _, _ = run(resume=state, weights=weights)
    assert result.losses == full_result.losses and result.steps == 9
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert result.probe_loss_start == full_result.probe_loss_start
    # what the loss plot draws: the save steps and the learning rate per step, carried through the resume
    assert full_result.saves == [4, 8] and result.saves == [4]  # the resumed run saves nothing itself
    assert [s for s, _ in full_result.lrs] == list(range(1, 10)) and result.lrs == full_result.lrs


def test_resume_past_the_end_is_refused():
    _, _, saved, _ = run(save_every=4)
    with pytest.raises(KilnError, match="already made 9 steps"):
        run(resume=dict(saved[8][0], step=9), weights=saved[8][1])


def test_resume_from_an_epoch_save_with_kohyas_noise_loss_and_epoch_options():
    options = dict(max_train_epochs=4, save_every_n_epochs=1, grad_accum=2, loss_type="huber",
                   huber_schedule="snr", debiased_estimation_loss=True, v_pred_like_loss=0.1,
                   validation_split=0.2, validate_every_n_steps=3)
    noise = NoiseConfig(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05,
                         multires_noise_iterations=3, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    full, full_result, saved, _ = run(options=options, noise=noise)
    assert [(step, epoch) for step, (_, _, epoch) in sorted(saved.items())] == [(2, 1), (4, 2), (6, 3)]
    assert full_result.saves == [2, 4, 6]
    state, weights, _ = saved[4]
    resumed, result, _, _ = run(resume=state, weights=weights, options=options, noise=noise)
    assert result.steps == 8 and result.losses == full_result.losses
    assert result.validation == full_result.validation and len(result.validation) >= 4
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("optimizer", ["Adafactor", "AdamWScheduleFree", "Prodigy", "pytorch_optimizer.CAME",
                                       "AdamW8bit"])
def test_resume_is_bit_identical_with_other_optimizers(optimizer):
    options = dict(optimizer_type=optimizer, optimizer_args={"weight_decay": 0.05}, lr_scheduler="polynomial",
                   lr_warmup_steps=0.2)
    full, full_result, saved, _ = run(save_every=5, options=options)
    state, weights, _ = saved[5]
    resumed, result, _, _ = run(resume=state, weights=weights, options=options)
    assert result.losses == full_result.losses
    assert all(torch.equal(full[k], resumed[k]) for k in full)
