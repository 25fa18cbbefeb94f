"""SD3 objective, weighting, text-encoder handling and LoRA layout, checked against values worked out by hand
from the published formulas (diffusers' SD3 recipe as kohya uses it)."""
import math
import random

import pytest
import torch
from torch import nn

from trainer_core.errors import KilnError
from trainer_core.families import sd3
from trainer_core.lora.network_args import block_selection, parse_network_args
from trainer_core.lora.targets import select_targets


def test_logit_normal_is_sigmoid_of_a_seeded_normal():
    u = sd3.sample_u("logit_normal", 5, torch.Generator().manual_seed(4), logit_mean=0.5, logit_std=2.0)
    z = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(u, 1 / (1 + torch.exp(-(z * 2.0 + 0.5))))


def test_mode_density_and_uniform_at_known_points():
    # mode: f(u) = 1 - u - s(cos²(πu/2) - 1 + u); f(0) = 1, f(1) = 0, f(0.5) = 0.5 - s(0.5 - 1 + 0.5) = 0.5
    g = torch.Generator().manual_seed(0)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = sd3.sample_u("mode", 1000, g, mode_scale=1.29)
    assert torch.allclose(m, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    assert m.min() >= 0 and m.max() <= 1
    assert torch.equal(sd3.sample_u("cosmap", 7, torch.Generator().manual_seed(1)),
                       torch.rand(7, generator=torch.Generator().manual_seed(1), dtype=torch.float64))


def test_shift_and_loss_weights_match_hand_values():
    assert float(sd3.shift_u(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert float(sd3.shift_u(torch.tensor(0.5), 1.0)) == pytest.approx(0.5)
    s = torch.tensor([0.25, 0.5])
    assert torch.allclose(sd3.loss_weight("sigma_sqrt", s), torch.tensor([16.0, 4.0]))
    # cosmap: 2 / (π (1 − 2σ + 2σ²)); σ=0.5 -> 2/(π·0.5); σ=0.25 -> 2/(π·0.625)
    assert torch.allclose(sd3.loss_weight("cosmap", s), torch.tensor([2 / (math.pi * 0.625), 4 / math.pi]))
    assert torch.equal(sd3.loss_weight("logit_normal", s), torch.ones(2))


def test_flow_noising_target_and_preconditioning():
    obj = sd3.SD3Objective("uniform")
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    nb = obj.at(x0, torch.tensor([250, 900]), noise)
    s = torch.tensor([0.25, 0.9]).view(-1, 1, 1, 1)
    assert torch.allclose(nb.x_t, (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.equal(nb.timesteps, torch.tensor([250.0, 900.0]))  # ComfyUI's σ·1000
    # a perfect velocity prediction (ε − x0) gives x0 back exactly, so zero loss
    assert torch.allclose(obj.output(noise - x0, nb), x0, atol=1e-5)


def test_sampled_timesteps_follow_the_scheme_and_shift():
    x0 = torch.zeros(4000, 1, 1, 1)
    plain = sd3.SD3Objective("uniform").sample(x0, torch.Generator().manual_seed(0)).timesteps
    shifted = sd3.SD3Objective("uniform", training_shift=3.0).sample(x0, torch.Generator().manual_seed(0)).timesteps
    assert 470 < plain.mean() < 530 and shifted.mean() > 650  # E[3u/(1+2u)] ≈ 0.677
    ln = sd3.SD3Objective("logit_normal", logit_mean=1.0).sample(x0, torch.Generator().manual_seed(0)).timesteps
    assert ln.median() == pytest.approx(1000 / (1 + math.exp(-1.0)), abs=15)


def test_network_args_parse_and_block_selection():
    args = parse_network_args("context_attn_dim=16\nemb_dims=[0, 0, 4, 0, 0, 0] train_block_indices=0,2-3")
    assert args == {"context_attn_dim": "16", "emb_dims": "[0, 0, 4, 0, 0, 0]", "train_block_indices": "0,2-3"}
    assert block_selection("0,2-3", 5) == [True, False, True, True, False]
    assert block_selection("none", 2) == [False, False] and block_selection(None, 2) == [True, True]
    with pytest.raises(KilnError, match="outside the model's blocks 0-4"):
        block_selection("3-7", 5)
    with pytest.raises(KilnError, match="cannot read"):
        parse_network_args("rank 4")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(4, 12), nn.Linear(4, 4)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(4, 24))


class TinyMMDiT(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.joint_blocks = nn.ModuleList()
        for _ in range(depth):
            jb = nn.Module()
            jb.context_block, jb.x_block = Block(), Block()
            self.joint_blocks.append(jb)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(16, 4, 2, 2)
        self.context_embedder = nn.Linear(8, 4)


def test_default_targets_are_every_linear_of_both_streams_as_kohyas_lora_sd3():
    """kohya's lora_sd3 gives every Linear of a SingleDiTBlock (attention, MLP, modulation) network_dim unless a
    *_dim says otherwise; attention_only=True keeps Kiln 0.2's attention-only default."""
    net = TinyMMDiT()
    default = sd3.SD3LayerRanks.from_args({}, rank=8, depth=3)
    paths = {p: r for p, _, r, _ in select_targets(net, default.rules(8.0))}
    layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    assert paths == {f"joint_blocks.{b}.{s}.{m}": 8 for b in range(3) for s in ("context_block", "x_block")
                     for m in layers if f"joint_blocks.{b}.{s}.{m}" in dict(net.named_modules())}
    assert {p.rsplit(".", 2)[-2] for p in paths} >= {"mlp", "adaLN_modulation"}
    only = sd3.SD3LayerRanks.from_args({"attention_only": "True"}, rank=8, depth=3)
    paths = {p: r for p, _, r, _ in select_targets(net, only.rules(8.0))}
    assert paths == {f"joint_blocks.{b}.{s}.attn.{m}": 8 for b in range(3) for s in ("context_block", "x_block")
                     for m in ("qkv", "proj")}
    custom = sd3.SD3LayerRanks.from_args(parse_network_args(
        "x_attn_dim=0 context_mlp_dim=2 x_mlp_dim=0 x_mod_dim=0 context_mod_dim=0 emb_dims=[3,0,5,0,0,0] "
        "train_block_indices=2"), rank=8, depth=3)
    paths = {p: r for p, _, r, _ in select_targets(net, custom.rules(8.0))}
    assert paths == {"joint_blocks.2.context_block.attn.qkv": 8, "joint_blocks.2.context_block.attn.proj": 8,
                     "joint_blocks.2.context_block.mlp.fc1": 2, "joint_blocks.2.context_block.mlp.fc2": 2,
                     "context_embedder": 3, "x_embedder.proj": 5}
    assert sd3.unet_namer("joint_blocks.2.context_block.attn.qkv") == "lora_unet_joint_blocks_2_context_block_attn_qkv"


def test_text_encoder_dropout_and_padding_masks():
    layout = sd3.TextLayout(clip_tokens=77)
    ctx, pooled = torch.ones(77 + 10, 4096), torch.ones(2048)
    c, p = sd3.drop_encoders(ctx, pooled, layout, {"clip_l": 1.0, "clip_g": 0.0, "t5": 1.0}, random.Random(0))
    assert c[:77, :768].abs().sum() == 0 and c[:77, 768:2048].min() == 1 and c[77:].abs().sum() == 0
    assert p[:768].abs().sum() == 0 and p[768:].min() == 1 and ctx.min() == 1  # inputs untouched
    drops = [sd3.drop_encoders(ctx, pooled, layout, {"clip_g": 0.3}, rng)[1][1000] == 0
             for rng in [random.Random(1)] for _ in range(2000)]
    assert 0.25 < sum(drops) / len(drops) < 0.35
    masked = sd3.mask_padding(ctx, layout, clip_len=5, t5_len=3, lg=True, t5=True)
    assert masked[:5].min() == 1 and masked[5:77].abs().sum() == 0
    assert masked[77:80].min() == 1 and masked[80:].abs().sum() == 0
