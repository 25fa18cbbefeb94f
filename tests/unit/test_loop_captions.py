"""The training loop augments captions at draw time, per epoch, from the training seed (no ComfyUI)."""
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.captions import CaptionOptions
from trainer_core.data.transforms import Geometry
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig, train

CAPTIONS = ["sks, red, ball, grass", "sks, blue, cube, sand", "sks, green, cone, snow"]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def run(opts: CaptionOptions, steps=12, seed=3) -> list[list[str]]:
    """Captions the conditioning saw at each training step (not the probe's)."""
    torch.manual_seed(0)
    toy = Toy()
    net = LoRANetwork(toy, [TargetRule("proj", ("linear",), 2, 1.0)], lambda p: "lora_unet_" + p)
    geometry = Geometry((8, 8), (8, 8), 0, 0, (8, 8))
    samples = [CachedSample(torch.randn(4, 2, 2), None, c, 1, False, geometry, f"{k}.png", opts)
               for k, c in enumerate(CAPTIONS)]
    seen: list[list[str]] = []
    probe: list[list[str]] = []

    def conditioning(captions, train=False, geometries=None):
        (seen if train else probe).append(list(captions))
        return {"context": torch.zeros(len(captions), 1, 4)}

    def forward(x_t, t, cond):
        return toy(x_t) + cond["context"].mean()

    acp = torch.linspace(0.99, 0.01, 100)
    cfg = TrainConfig(steps=steps, batch_size=1, seed=seed, learning_rate=1e-3)
    with net.attached():
        train(net, SD1Objective(acp), forward, conditioning, LatentCache(samples, None, "toy"), lambda z: z, cfg,
              torch.device("cpu"))
    assert len(probe) == 2 and probe[0] == probe[1]  # before and after: the same steady captions
    return seen


def test_shuffled_captions_vary_per_draw_keep_the_kept_tag_and_never_reorder_batches():
    plain = run(CaptionOptions(), steps=30)
    shuffled = run(CaptionOptions(shuffle_caption=True, keep_tokens=1), steps=30)
    assert len(set(c for [c] in plain)) == 3
    assert len(set(c for [c] in shuffled)) > 6
    assert all(c.startswith("sks, ") for [c] in shuffled)
    # same images in the same order: augmentation has its own random stream
    assert [sorted(c.split(", ")) for [c] in plain] == [sorted(c.split(", ")) for [c] in shuffled]
    assert run(CaptionOptions(shuffle_caption=True), steps=30) == run(CaptionOptions(shuffle_caption=True), steps=30)
    assert run(CaptionOptions(shuffle_caption=True), steps=30) != run(CaptionOptions(shuffle_caption=True), steps=30,
                                                                       seed=4)


def test_epochs_count_from_one_for_dropout_every_n_epochs():
    seen = run(CaptionOptions(caption_dropout_every_n_epochs=2, caption_prefix="pre"), steps=12)  # 3 images: 4 epochs
    empty = [k // 3 + 1 for k, [c] in enumerate(seen) if c == ""]
    assert empty == [2, 2, 2, 4, 4, 4]
    assert all(c.startswith("pre sks") for [c] in seen if c)
