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
