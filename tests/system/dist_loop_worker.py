"""One process of the 2-process loop test (tests/system/test_distributed_loop.py), started by torchrun; also runs the
single-process reference when started plainly. Writes rank 0's LoRA, losses and last state to argv[1]."""
import sys

import torch
from torch import nn

from trainer_core.training import distributed
from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.captions import CaptionOptions
from trainer_core.data.transforms import Geometry
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig, train


def data() -> LatentCache:
    """5 images, repeats 2,2,2,2,1: 9 draws an epoch, so a global batch of 4 leaves a last batch of 1 (rank 1's
    share of it is empty); flips and caption augmentation draw per sample."""
    g = Geometry((32, 32), (32, 32), 0, 0, (32, 32))
    gen = torch.Generator().manual_seed(0)
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3)
    return LatentCache([CachedSample(torch.randn(4, 4, 4, generator=gen), None, f"a{k}, b{k}, c{k}", 2 if k < 4 else 1,
                                     False, g, f"{k}.png", opts, flipped_latent=torch.randn(4, 4, 4, generator=gen))
                        for k in range(5)], dataset=None, encoder_id="test")


def run(batch_size: int, steps: int, resume=None, weights=None) -> dict:
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: f"lora_{p}", seed=1 + distributed.rank())
    if weights is not None:
        network.load_kohya_state_dict(weights)
    states = {}

    def conditioning(caps, train=False, geometries=None):
        return {"context": torch.tensor([[float(len(c))] for c in caps])}

    def forward(x, t, c):
        return root(x) * (1 + c["context"].view(-1, 1, 1, 1) / 100)

    def on_save(step, state, result, epoch=None):
        states[step] = (state, network.kohya_state_dict())

    cfg = TrainConfig(steps=steps, batch_size=batch_size, seed=5, learning_rate=1e-2, lr_scheduler="cosine",
                      save_every=2, grad_accum=2)
    with network.attached():
        objective = SD1Objective(torch.linspace(0.99, 0.01, 100), min_timestep=10, max_timestep=90)
        result = train(network, objective, forward, conditioning, data(), lambda z: z, cfg, torch.device("cpu"),
                       on_save=on_save, resume=resume)
    return {"lora": network.kohya_state_dict(), "losses": result.losses, "states": states, "notes": result.notes}


if __name__ == "__main__":
    if distributed.launched():
        distributed.init(torch.device("cpu"))
    out = run(int(sys.argv[2]), int(sys.argv[3]))
    if distributed.is_main():
        torch.save(out, sys.argv[1])
    distributed.shutdown()
