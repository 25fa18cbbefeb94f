"""Save every N steps and resume (trainer_core/loop.py): a run resumed from the state and adapters saved at
step k ends bit-identical to the uninterrupted run, with flips, caption augmentation, LoRA dropout and more
batches than one epoch in play; the state survives torch.save / torch.load(weights_only=True)."""
import io

import pytest
import torch
from torch import nn

from trainer_core.cache import CachedSample, LatentCache
from trainer_core.data.captions import CaptionOptions
from trainer_core.data.transforms import Geometry
from trainer_core.errors import KilnError
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.loop import TrainConfig, train

CFG = dict(steps=9, batch_size=2, seed=5, learning_rate=1e-2, lr_scheduler="cosine", warmup_steps=2)


def data() -> LatentCache:
    g = Geometry((32, 32), (32, 32), 0, 0, (32, 32))
    gen = torch.Generator().manual_seed(0)
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3)
    samples = [CachedSample(torch.randn(4, 4, 4, generator=gen), None, f"a{k}, b{k}, c{k}", 1 + k % 2, False, g,
                            f"{k}.png", opts, flipped_latent=torch.randn(4, 4, 4, generator=gen)) for k in range(5)]
    return LatentCache(samples, dataset=None, encoder_id="test")


def run(resume=None, weights=None, save_every=0):
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: f"lora_{p}", dropout=0.2, seed=1)
    if weights is not None:
        network.load_kohya_state_dict(weights)
    saved = {}
    captions = []

    def conditioning(caps, train=False, geometries=None):
        captions.extend(caps)
        return {"context": torch.tensor([[float(len(c))] for c in caps])}

    def forward(x, t, c):
        return root(x) * (1 + c["context"].view(-1, 1, 1, 1) / 100)

    def on_save(step, state, result):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        saved[step] = (torch.load(buf, weights_only=True), network.kohya_state_dict())

    with network.attached():
        result = train(network, SD1Objective(torch.linspace(0.99, 0.01, 100)), forward, conditioning, data(),
                       lambda z: z, TrainConfig(**CFG, save_every=save_every), torch.device("cpu"),
                       on_save=on_save, resume=resume)
    return network.kohya_state_dict(), result, saved, captions


def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one():
    full, full_result, saved, _ = run(save_every=4)
    assert sorted(saved) == [4, 8]  # not at the last step: the final LoRA is the node's output
    state, weights = saved[4]
    resumed, result, _, _ = run(resume=state, weights=weights)
    assert result.losses == full_result.losses and result.steps == 9
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert result.probe_loss_start == full_result.probe_loss_start


def test_resume_past_the_end_is_refused():
    _, _, saved, _ = run(save_every=4)
    with pytest.raises(KilnError, match="already made 9 steps"):
        run(resume=dict(saved[8][0], step=9), weights=saved[8][1])
