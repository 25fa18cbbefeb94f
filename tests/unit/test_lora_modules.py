import itertools

import torch
from torch import nn

from trainer_core.lora.modules import LoRAModule
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule, select_targets


def test_zero_init_leaves_base_output_unchanged_and_detach_restores():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    ref = base(x)
    lora = LoRAModule("lora_unet_x", base, rank=4, alpha=2)
    lora.attach()
    assert torch.equal(base(x), ref)
    lora.detach()
    assert "forward" not in base.__dict__
    assert torch.equal(base(x), ref)


def test_linear_and_conv_add_exactly_their_delta_weight():
    torch.manual_seed(0)
    for base, x in [(nn.Linear(8, 6), torch.randn(2, 5, 8)), (nn.Conv2d(4, 5, 3, padding=1), torch.randn(2, 4, 7, 7))]:
        lora = LoRAModule("n", base, rank=3, alpha=1.5)
        nn.init.normal_(lora.lora_up.weight)
        lora.attach()
        got = base(x)
        lora.detach()
        w = base.weight + lora.delta_weight()
        want = nn.functional.linear(x, w, base.bias) if isinstance(base, nn.Linear) else \
            nn.functional.conv2d(x, w, base.bias, padding=1)
        assert torch.allclose(got, want, atol=1e-5)
        assert abs(lora.scale - 0.5) < 1e-9


def test_rank_dropout_runs_for_3d_linear_and_conv():
    """kohya's rank_dropout on a 3-D linear input (batch, tokens, features) and on a conv: each sample's update is
    the LoRA path with one keep-mask over the ranks, shared by all its tokens / pixels, the kept ranks scaled by
    1 / (1 - rank_dropout); samples draw their own masks."""
    torch.manual_seed(0)
    for base, x in [(nn.Linear(8, 6), torch.randn(4, 5, 8)), (nn.Conv2d(4, 5, 1), torch.randn(4, 4, 3, 3))]:
        lora = LoRAModule("n", base, rank=4, alpha=4, rank_dropout=0.5).train()
        nn.init.normal_(lora.lora_up.weight)
        ref = base(x)
        lora.attach()
        got = base(x)
        lora.detach()
        assert got.shape == ref.shape
        mask_shape = (1, 4, 1, 1) if isinstance(base, nn.Conv2d) else (1, 1, 4)
        masks = []
        with torch.no_grad():
            for b in range(len(x)):
                h = lora.lora_down(x[b:b + 1])
                fits = [keep for keep in itertools.product((0.0, 1.0), repeat=4)
                        if torch.allclose(got[b:b + 1] - ref[b:b + 1],
                                          lora.lora_up(h * torch.tensor(keep).view(mask_shape)) * lora.scale / 0.5,
                                          atol=1e-5)]
                assert len(fits) == 1, (b, fits)
                masks.append(fits[0])
        assert any(0.0 in m for m in masks) and any(1.0 in m for m in masks) and len(set(masks)) > 1, masks


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)) for _ in range(2)])
        self.conv = nn.Conv2d(2, 2, 3)
        self.norm = nn.LayerNorm(4)


def test_rules_select_first_match_and_rank_zero_excludes():
    toy = Toy()
    rules = [TargetRule(r"blocks\.1\..*", ("linear",), 0, 1), TargetRule(r"blocks\.\d+\.\d+", ("linear",), 4, 4),
             TargetRule(r"conv", ("conv3x3",), 2, 1)]
    names = [p for p, *_ in select_targets(toy, rules)]
    assert names == ["blocks.0.0", "blocks.0.2", "conv"]


def test_network_kohya_state_dict_round_trip():
    toy = Toy()
    net = LoRANetwork(toy, [TargetRule(r"blocks\.\d+\.\d+", ("linear",), 2, 1.0)], lambda p: "lora_unet_" + p.replace(".", "_"))
    assert len(net) == 4
    sd = net.kohya_state_dict()
    assert set(sd) == {f"lora_unet_blocks_{b}_{i}.{k}" for b in (0, 1) for i in (0, 2)
                       for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    other = LoRANetwork(Toy(), [TargetRule(r"blocks\.\d+\.\d+", ("linear",), 2, 1.0)], lambda p: "lora_unet_" + p.replace(".", "_"))
    other.load_kohya_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


def test_alpha_zero_is_alpha_rank_as_kohya_reads_it():
    """kohya's LoRAModule: alpha 0 (or None) -> alpha = lora_dim, scale 1; the file's alpha tensor holds the rank.
    With a literal 0 the update (and so every gradient) would be zero."""
    torch.manual_seed(0)
    for base, x in [(nn.Linear(8, 6), torch.randn(2, 8)), (nn.Conv2d(4, 5, 3, padding=1), torch.randn(1, 4, 5, 5))]:
        lora = LoRAModule("n", base, rank=4, alpha=0)
        assert lora.alpha == 4.0 and lora.scale == 1.0
        assert float(lora.state_items()["alpha"]) == 4.0
        lora.attach()
        base(x).sum().backward()
        lora.detach()
        assert lora.lora_up.weight.grad.abs().sum() > 0
    # a file whose alpha tensor says 0 loads as alpha = rank too (kohya's create_network_from_weights)
    net = LoRANetwork(Toy(), [TargetRule(r"blocks\.\d+\.\d+", ("linear",), 2, 1.0)], lambda p: "lora_unet_" + p.replace(".", "_"))
    sd = {k: (torch.tensor(0.0) if k.endswith(".alpha") else v) for k, v in net.kohya_state_dict().items()}
    net.load_kohya_state_dict(sd)
    assert {a.alpha for a in net.adapters.values()} == {2.0}


def delta_of(lora: LoRAModule, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = base(x)
    lora.attach()
    try:
        return base(x) - ref
    finally:
        lora.detach()


def eye_lora(rank: int, **dropouts) -> tuple[LoRAModule, nn.Linear]:
    """A LoRA whose up projection is the identity (out = rank), so its delta shows the rank activations."""
    base = nn.Linear(16, rank)
    lora = LoRAModule("n", base, rank=rank, alpha=rank, **dropouts).train()  # scale 1
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.eye(rank))
    return lora, base


def test_network_dropout_drops_rank_activations_as_kohya():
    """kohya's network_dropout p: each element of down(x) is zeroed with probability p, the rest scaled by 1/(1-p)
    (networks/lora.py drops the down projection's output, not the input)."""
    torch.manual_seed(0)
    lora, base = eye_lora(8, dropout=0.3)
    x = torch.randn(64, 20, 16)
    with torch.no_grad():
        h = lora.lora_down(x)
        got = delta_of(lora, base, x)
    kept = got != 0
    assert torch.allclose(got[kept], h[kept] / 0.7, atol=1e-5)  # kept elements: scaled, never mixed
    assert abs((~kept).float().mean().item() - 0.3) < 0.02  # 10240 elements: ±4.5 sigma
    assert len({tuple(m) for m in kept.reshape(-1, 8).tolist()}) > 100  # element-wise, not per sample or rank
    with torch.no_grad():
        assert torch.allclose(delta_of(lora.eval(), base, x), h, atol=1e-5)  # eval: no dropout


def test_rank_dropout_statistics():
    """kohya's rank_dropout p: per sample, each rank is dropped with probability p for all its tokens, and the
    adapter scaled by 1/(1-p)."""
    torch.manual_seed(1)
    lora, base = eye_lora(8, rank_dropout=0.25)
    x = torch.randn(2000, 3, 16)
    with torch.no_grad():
        h = lora.lora_down(x)
        got = delta_of(lora, base, x)
    kept = got != 0
    assert torch.equal(kept, kept[:, :1].expand_as(kept))  # one draw per sample and rank, shared by its tokens
    assert torch.allclose(got[kept], h[kept] / 0.75, atol=1e-5)
    assert abs((~kept[:, 0]).float().mean().item() - 0.25) < 0.02  # 16000 draws


def test_module_dropout_statistics():
    """kohya's module_dropout p: the whole adapter is left out of a forward with probability p."""
    torch.manual_seed(2)
    lora, base = eye_lora(4, module_dropout=0.4)
    x = torch.randn(2, 16)
    with torch.no_grad():
        full = lora.lora_down(x)
        deltas = [delta_of(lora, base, x) for _ in range(3000)]
    off = sum(bool((d == 0).all()) for d in deltas)
    assert all(bool((d == 0).all()) or torch.allclose(d, full, atol=1e-5) for d in deltas)  # all or nothing
    assert abs(off / 3000 - 0.4) < 0.04
