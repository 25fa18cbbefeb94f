"""The loop's options turned on, each against what it must equal: gradient accumulation of N batches of B
gives batch N·B's first-step gradient; max_grad_norm clips the update to that norm; bf16/fp16 autocast
reach the network (fp16 through the GradScaler); gradient checkpointing and fused_backward_pass train the
same weights as the plain loop; fused_backward_pass is refused, with the reason, where it would differ."""
import pytest
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.transforms import plan_geometry
from trainer_core.errors import KilnError
from trainer_core.families.sd1 import SD1Objective
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig, train

SGD = dict(optimizer="SGD", optimizer_args={"momentum": 0.0, "weight_decay": 0.0}, learning_rate=1.0,
           max_grad_norm=0.0)  # one step of plain SGD at lr 1 moves every weight by −gradient


class PerSampleNoise(SD1Objective):
    """Noise and timestep fixed per sample (seeded by its content), so batches of any size see the same ones."""

    def sample(self, x0, generator):
        ts, noises = [], []
        for x in x0:
            g = torch.Generator().manual_seed(int(x.abs().sum().item() * 1000))
            ts.append(int(torch.randint(0, 100, (1,), generator=g)))
            noises.append(torch.randn(x.shape, generator=g))
        return self.at(x0, torch.tensor(ts), torch.stack(noises))


def cache(n=4):
    g = plan_geometry((32, 32), (32, 32))
    return LatentCache([CachedSample(torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(i)), None, "c", 1,
                                     False, g, f"{i}.png") for i in range(n)], None, "x")


def run(cfg: TrainConfig, objective=None, checkpoint=False, seen=None):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU()), nn.Conv2d(8, 4, 1)]
    root = nn.Sequential(*blocks)
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: "lora_" + p.replace(".", "_"))
    start = {k: v.clone() for k, v in network.kohya_state_dict().items()}

    def forward(x, t, c):
        out = root(x)
        if seen is not None:
            seen.append((out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    with network.attached():
        train(network, objective or SD1Objective(torch.linspace(0.99, 0.01, 100)), forward,
              lambda caps, train=False, geometries=None: {}, cache(), lambda z: z, cfg, torch.device("cpu"),
              checkpoint_blocks=blocks if checkpoint else ())
    end = network.kohya_state_dict()
    return {k: end[k] - start[k] for k in end if k.endswith("weight")}, end


def test_grad_accumulation_of_n_batches_equals_one_batch_of_n_times_b():
    accumulated, _ = run(TrainConfig(steps=1, batch_size=2, grad_accum=2, **SGD), PerSampleNoise(torch.linspace(0.99, 0.01, 100)))
    whole, _ = run(TrainConfig(steps=1, batch_size=4, grad_accum=1, **SGD), PerSampleNoise(torch.linspace(0.99, 0.01, 100)))
    assert any(d.abs().sum() > 0 for d in whole.values())
    for k in whole:
        assert torch.allclose(accumulated[k], whole[k], rtol=1e-5, atol=1e-7), k


def test_max_grad_norm_clips_the_update_to_that_norm():
    free, _ = run(TrainConfig(steps=1, batch_size=4, **SGD))
    clipped, _ = run(TrainConfig(steps=1, batch_size=4, **{**SGD, "max_grad_norm": 1e-4}))
    norm = lambda d: torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())).item()  # noqa: E731
    assert norm(free) > 1e-3
    assert norm(clipped) == pytest.approx(1e-4, rel=1e-4)  # scaled by max_norm / (‖g‖ + 1e-6)
    ratio = torch.cat([(clipped[k] / free[k])[free[k].abs() > 1e-6] for k in free])
    assert ratio.numel() and torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3)  # one factor for all


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_autocasts_the_forward_and_keeps_lora_weights_fp32(precision, dtype):
    seen = []
    delta, end = run(TrainConfig(steps=2, batch_size=2, learning_rate=1e-2, precision=precision), seen=seen)
    assert seen and all(d == dtype and on for d, on in seen)
    assert all(v.dtype == torch.float32 for k, v in end.items() if k.endswith("weight"))
    assert any(d.abs().sum() > 0 for d in delta.values()) and all(torch.isfinite(d).all() for d in delta.values())


def test_gradient_checkpointing_trains_the_same_weights():
    cfg = dict(steps=3, batch_size=2, learning_rate=1e-2)
    plain, _ = run(TrainConfig(**cfg))
    checkpointed, _ = run(TrainConfig(**cfg, gradient_checkpointing=True), checkpoint=True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-7) for k in plain)


@pytest.mark.parametrize("optimizer", ["AdamW", "Adafactor", "pytorch_optimizer.CAME", "AdamWScheduleFree"])
def test_fused_backward_pass_trains_the_same_weights(optimizer):
    cfg = dict(steps=3, batch_size=2, learning_rate=1e-2, max_grad_norm=0.0, optimizer_type=optimizer,
               lr_scheduler="cosine")
    plain, _ = run(TrainConfig(**cfg))
    fused, _ = run(TrainConfig(**cfg, fused_backward_pass=True))
    assert all(torch.allclose(plain[k], fused[k], rtol=1e-5, atol=1e-7) for k in plain)


@pytest.mark.parametrize("options, why", [
    (dict(grad_accum=2), "gradient_accumulation_steps > 1"),
    (dict(max_grad_norm=1.0), "max_grad_norm > 0"),
    (dict(precision="fp16"), "fp16"),
    (dict(optimizer="Prodigy"), "Prodigy: it estimates one step size from all parameters"),
])
def test_fused_backward_pass_is_refused_where_it_would_differ(options, why):
    with pytest.raises(KilnError, match=f"fused_backward_pass cannot be used with {why}"):
        run(TrainConfig(**{"steps": 1, "max_grad_norm": 0.0, **options}, fused_backward_pass=True))


def reg_cache():
    """A training image and a regularization image in one batch."""
    g = plan_geometry((32, 32), (32, 32))
    return LatentCache([CachedSample(torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(i)), None, "c", 1,
                                     i == 1, g, f"{i}.png") for i in range(2)], None, "x")


def one_step(prior_loss_weight: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    network = LoRANetwork(root, [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: "lora_" + p.replace(".", "_"))
    start = {k: v.clone() for k, v in network.kohya_state_dict().items()}
    with network.attached():
        train(network, PerSampleNoise(torch.linspace(0.99, 0.01, 100)), lambda x, t, c: root(x),
              lambda caps, train=False, geometries=None: {}, reg_cache(), lambda z: z,
              TrainConfig(steps=1, batch_size=2, prior_loss_weight=prior_loss_weight, **SGD), torch.device("cpu"))
    end = network.kohya_state_dict()
    return {k: end[k] - start[k] for k in end if k.endswith("weight")}


def test_prior_loss_weight_scales_the_regularization_images_gradient():
    """kohya: loss = mean over the batch of loss_i · (prior_loss_weight if image i is a regularization image else 1),
    so one SGD step's update is the training image's part plus prior_loss_weight times the reg image's part."""
    none, one, three = one_step(0.0), one_step(1.0), one_step(3.0)
    reg_part = {k: one[k] - none[k] for k in one}
    assert any(v.abs().sum() > 1e-6 for v in reg_part.values()) and any(v.abs().sum() > 1e-6 for v in none.values())
    for k in one:
        assert torch.allclose(three[k], none[k] + 3.0 * reg_part[k], rtol=1e-4, atol=1e-7), k

