"""Full fine-tuning (trainer_core.training.full) through the one training loop: the host modules get their own tensors back
untouched, kohya's stop_text_encoder_training stops the text encoder after exactly N steps, and
fused_backward_pass trains the same full weights as the plain loop (SGD, AdamW)."""
import pytest
import torch
from torch import nn

from trainer_core.data.cache import CachedSample, LatentCache
from trainer_core.data.transforms import plan_geometry
from trainer_core.families.sd1 import SD1Objective
from trainer_core.training.full import FullNetwork
from trainer_core.training.loop import TrainConfig, train


def cache(n=4):
    g = plan_geometry((32, 32), (32, 32))
    return LatentCache([CachedSample(torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(i)), None, "c", 1,
                                     False, g, f"{i}.png") for i in range(n)], None, "x")


class Host(nn.Module):
    """A "UNet" whose output depends on a "text encoder"'s output, as SD's cross-attention makes it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.unet = nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1))
        self.te = nn.Linear(3, 4)

    def conditioning(self, captions, train=False, geometries=None):
        return {"context": self.te(torch.ones(len(captions), 3))}

    def forward(self, x, t, cond):
        return self.unet(x) + cond["context"][:, :, None, None]


def run(cfg: TrainConfig, te_lr: float | None = None):
    """Train a fresh Host; returns (its trained weights by key, the host's own tensors afterwards, before)."""
    host = Host()
    before = {k: (v, v.detach().clone()) for k, v in host.named_parameters()}
    net = FullNetwork()
    net.add(host.unet, "unet", "unet.")
    if te_lr is not None:
        net.add(host.te, "te", "te.")
        cfg.group_lrs = {"te": te_lr}
    try:
        train(net, SD1Objective(torch.linspace(0.99, 0.01, 100)), host, host.conditioning, cache(), lambda z: z, cfg,
              torch.device("cpu"))
        trained = {**net.trained("unet"), **net.trained("te")}
    finally:
        net.restore()
    return trained, dict(host.named_parameters()), before


def test_the_host_gets_its_own_tensors_back_unchanged_and_the_trained_weights_differ():
    trained, after, before = run(TrainConfig(steps=3, batch_size=2, learning_rate=1e-2), te_lr=1e-2)
    assert trained.keys() == {f"{k}" for k in before}
    for k, (tensor, values) in before.items():
        assert after[k] is tensor and torch.equal(tensor, values), k
        assert not torch.equal(trained[k], values), f"{k} did not train"
        assert trained[k].dtype == values.dtype and not trained[k].requires_grad


def test_restore_after_an_error_leaves_the_host_as_it_was():
    host = Host()
    before = {k: (v, v.detach().clone()) for k, v in host.named_parameters()}
    net = FullNetwork()
    net.add(host, "unet")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # what a half-finished run leaves in the trainable tensors
    net.restore()
    net.restore()
    assert all(dict(host.named_parameters())[k] is t and torch.equal(t, v) for k, (t, v) in before.items())


def test_stop_text_encoder_training_trains_the_text_encoder_for_exactly_n_steps():
    base = dict(batch_size=2, learning_rate=1e-2, optimizer="AdamW", max_grad_norm=0.0)
    stopped, _, before = run(TrainConfig(steps=5, stop_text_encoder_training=2, **base), te_lr=1e-2)
    two, _, _ = run(TrainConfig(steps=2, **base), te_lr=1e-2)
    five, _, _ = run(TrainConfig(steps=5, **base), te_lr=1e-2)
    for k in ("te.weight", "te.bias"):
        assert not torch.equal(stopped[k], before[k][1])     # it trained ...
        assert torch.equal(stopped[k], two[k])               # ... for steps 1 and 2 exactly (AdamW decays nothing after)
        assert not torch.equal(stopped[k], five[k])
    for k in ("unet.0.weight", "unet.2.weight"):
        assert not torch.equal(stopped[k], two[k])           # the UNet trains on to step 5


def test_stop_text_encoder_training_at_zero_never_trains_it():
    trained, _, before = run(TrainConfig(steps=2, batch_size=2, learning_rate=1e-2, stop_text_encoder_training=0),
                             te_lr=1e-2)
    assert torch.equal(trained["te.weight"], before["te.weight"][1])
    assert not torch.equal(trained["unet.0.weight"], before["unet.0.weight"][1])


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_fused_backward_pass_trains_the_same_full_weights(optimizer):
    cfg = dict(steps=3, batch_size=2, learning_rate=1e-2, max_grad_norm=0.0, optimizer=optimizer,
               lr_scheduler="cosine")
    plain, _, before = run(TrainConfig(**cfg), te_lr=5e-3)
    fused, _, _ = run(TrainConfig(**cfg, fused_backward_pass=True), te_lr=5e-3)
    assert plain.keys() == fused.keys() == before.keys()
    for k in plain:
        assert not torch.equal(plain[k], before[k][1]), k
        assert torch.allclose(plain[k], fused[k], rtol=1e-5, atol=1e-7), k


def test_sgd_one_step_moves_every_weight_by_minus_lr_times_its_gradient():
    """The published SGD rule w ← w − lr·g (momentum 0, no decay), g taken by hand from the same loss."""
    cfg = TrainConfig(steps=1, batch_size=4, learning_rate=0.5, optimizer="SGD", max_grad_norm=0.0,
                      optimizer_args={"momentum": 0.0, "weight_decay": 0.0})
    trained, _, before = run(cfg)
    host = Host()
    objective = SD1Objective(torch.linspace(0.99, 0.01, 100))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    import random
    from trainer_core.training.epochs import epoch_batches
    batch = epoch_batches(cache(), 4, random.Random(cfg.seed))[0]
    x0 = torch.stack([cache().samples[i].latent for i in batch])
    nb = objective.sample(x0, gen)
    loss = ((host(nb.x_t, nb.timesteps, host.conditioning(["c"] * 4)) - nb.target) ** 2).mean()
    loss.backward()
    for k, p in host.unet.named_parameters():
        assert torch.allclose(trained[f"unet.{k}"], before[f"unet.{k}"][1] - 0.5 * p.grad, atol=1e-6), k
