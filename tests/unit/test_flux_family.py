"""FLUX.1's objective by kohya's formulas (library/flux_train_utils.py): each timestep_sampling option's σ
distribution against the formula's quantiles, flux_shift's dependence on the image size, the prediction types, the
LoRA targets of lora_flux and the block-swap split."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer_core.errors import KilnError
from trainer_core.families import flux
from trainer_core.families.flow import PREDICTION_TYPES, shift_u
from trainer_core.lora.targets import select_targets

N = 200_000
Q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
SHAPE = (N, 16, 64, 64)  # 512 px: 1024 packed tokens


def draw(sampling: str, shape=SHAPE, **kw) -> torch.Tensor:
    return flux.draw_sigma(sampling, **kw)(N, torch.Generator().manual_seed(0), shape)


def normal_quantiles(scale: float) -> torch.Tensor:
    """Quantiles of sigmoid(scale·n), n ~ N(0, 1): the formula's, not a draw."""
    return torch.sigmoid(scale * torch.special.ndtri(Q))


def close(sigmas: torch.Tensor, expected: torch.Tensor, tol: float = 4e-3):
    assert torch.allclose(torch.quantile(sigmas.double(), Q), expected, atol=tol), (torch.quantile(sigmas, Q), expected)


def test_uniform_and_sigmoid():
    close(draw("uniform"), Q)
    close(draw("sigmoid", sigmoid_scale=1.0), normal_quantiles(1.0))
    close(draw("sigmoid", sigmoid_scale=2.5), normal_quantiles(2.5))
    assert abs(float(draw("sigmoid").mean()) - 0.5) < 3e-3  # symmetric about 0.5


def test_shift_is_the_discrete_flow_shift_of_the_sigmoid_draw():
    s = normal_quantiles(1.0)
    close(draw("shift", discrete_flow_shift=3.0), 3 * s / (1 + 2 * s))
    assert float(draw("shift", discrete_flow_shift=3.0).mean()) > float(draw("sigmoid").mean()) + 0.1


def test_flux_shift_depends_on_resolution_as_flux1_schedules():
    s = normal_quantiles(1.0)
    for h, w in ((32, 32), (64, 64), (128, 128)):
        tokens = (h // 2) * (w // 2)
        mu = 0.5 + 0.65 * (tokens - 256) / 3840  # kohya's get_lin_function(y1=0.5, y2=1.15) at the packed size
        close(draw("flux_shift", shape=(N, 16, h, w)), math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
    small, large = draw("flux_shift", shape=(N, 16, 32, 32)), draw("flux_shift", shape=(N, 16, 128, 128))
    assert float(large.mean()) > float(small.mean()) + 0.1  # larger images train noisier, as FLUX.1 samples them


def test_sigma_sampling_snaps_to_kohyas_shifted_schedule():
    sig = draw("sigma", discrete_flow_shift=3.0)
    grid = shift_u(torch.arange(1, 1001, dtype=torch.float64) / 1000, 3.0)  # FlowMatchEulerDiscrete's 1000 σ
    assert torch.isin(sig, grid).all()
    # u ~ U(0, 1) -> index ⌊1000u⌋ -> σ = shift((1000 - i) / 1000) ≈ shift(1 - u): the σ quantile q is shift(q)
    close(sig, shift_u(Q, 3.0), tol=5e-3)
    ln = draw("sigma", discrete_flow_shift=1.0, weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0)
    close(ln, normal_quantiles(1.0), tol=5e-3)  # 1 - sigmoid(n) is sigmoid(-n), the same distribution


def test_prediction_types_and_velocity_target():
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    opts = dict(timestep_sampling="uniform", sigmoid_scale=1.0, discrete_flow_shift=3.0, weighting_scheme="cosmap",
                logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    t = torch.tensor([250, 750])
    raw = flux.objective(opts | dict(model_prediction_type="raw"), lambda s: s).at(x0, t, noise)
    s = torch.tensor([0.25, 0.75]).view(-1, 1, 1, 1)
    assert torch.allclose(raw.x_t, (1 - s) * x0 + s * noise) and torch.equal(raw.target, noise - x0)
    assert torch.allclose(raw.timesteps, torch.tensor([0.25, 0.75]))  # ComfyUI's Flux timestep is σ itself
    assert raw.weight is None
    pred = torch.randn_like(x0)
    objs = {p: flux.objective(opts | dict(model_prediction_type=p), lambda s: s) for p in PREDICTION_TYPES}
    assert torch.equal(objs["raw"].output(pred, raw), pred)
    assert torch.allclose(objs["additive"].output(pred, raw), pred + raw.x_t)
    scaled = objs["sigma_scaled"].at(x0, t, noise)
    assert torch.allclose(objs["sigma_scaled"].output(pred, scaled), scaled.x_t - s * pred)
    assert torch.allclose(scaled.weight, 2 / (math.pi * (1 - 2 * s.view(-1) + 2 * s.view(-1) ** 2)))  # cosmap


class Block(nn.Module):
    def __init__(self, names):
        super().__init__()
        for n in names:
            parent = self
            *path, leaf = n.split(".")
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            parent.add_module(leaf, nn.Linear(4, 4))


DOUBLE = ["img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
          "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]
SINGLE = ["linear1", "linear2", "modulation.lin"]


def toy_flux(double=3, single=4):
    net = nn.Module()
    net.double_blocks = nn.ModuleList(Block(DOUBLE) for _ in range(double))
    net.single_blocks = nn.ModuleList(Block(SINGLE) for _ in range(single))
    for name in ("img_in", "txt_in"):
        net.add_module(name, nn.Linear(4, 4))
    net.time_in = Block(["in_layer", "out_layer"])
    return net


def ranks(args: dict, net=None) -> dict:
    net = net or toy_flux()
    return {flux.unet_namer(p): r for p, _, r, _ in select_targets(net, flux.rules(args, 4, 4.0, 3, 4, "node"))}


def test_lora_flux_targets_every_block_linear_by_default():
    r = ranks({})
    assert len(r) == 3 * 10 + 4 * 3 and set(r.values()) == {4}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in r and "lora_unet_single_blocks_3_linear1" in r
    assert not any(k.startswith(("lora_unet_img_in", "lora_unet_time_in")) for k in r)


def test_type_dims_in_dims_and_block_selection_as_lora_flux():
    r = ranks({"img_attn_dim": "2", "txt_mlp_dim": "0", "single_dim": "3", "single_mod_dim": "0", "img_mod_dim": "5",
               "in_dims": "[1,6,0,0,0]", "train_double_block_indices": "0,2", "train_single_block_indices": "1-2"})
    assert r["lora_unet_double_blocks_0_img_attn_qkv"] == 2 and r["lora_unet_double_blocks_2_img_attn_proj"] == 2
    assert r["lora_unet_double_blocks_0_img_mod_lin"] == 5 and r["lora_unet_double_blocks_0_txt_mod_lin"] == 4
    assert "lora_unet_double_blocks_0_txt_mlp_0" not in r and "lora_unet_double_blocks_1_img_attn_qkv" not in r
    assert r["lora_unet_single_blocks_1_linear1"] == 3 and r["lora_unet_single_blocks_2_linear2"] == 3
    assert "lora_unet_single_blocks_1_modulation_lin" not in r and "lora_unet_single_blocks_0_linear1" not in r
    assert r["lora_unet_img_in"] == 1 and r["lora_unet_time_in_in_layer"] == 6 and r["lora_unet_time_in_out_layer"] == 6
    assert "lora_unet_txt_in" not in r
    assert not any("single" in k for k in ranks({"train_blocks": "double"}))
    with pytest.raises(KilnError, match="split_qkv"):
        ranks({"split_qkv": "True"})


def test_blocks_to_swap_split_as_kohya():
    net = toy_flux(double=19, single=38)
    swapped = flux.swap_blocks(net, 18)  # kohya: 9 double blocks, 18 single blocks
    assert swapped == list(net.double_blocks)[10:] + list(net.single_blocks)[20:]
    assert len(flux.swap_blocks(net, 5)) == 2 + 6


def test_names_and_metadata():
    assert [flux.modelspec_architecture(c) for c in ("Flux", "FluxSchnell", "Chroma")] == \
        ["flux-1-dev/lora", "flux-1-schnell/lora", "chroma/lora"]
    assert [flux.base_model_version(c) for c in ("Flux", "FluxSchnell", "Chroma")] == ["flux1", "flux1", "chroma"]
    # kohya's sai_model_spec names the model's own code as modelspec.implementation for Flux and Chroma
    assert [flux.modelspec_implementation(c) for c in ("Flux", "FluxSchnell", "Chroma")] == \
        ["https://github.com/black-forest-labs/flux"] * 2 + ["https://huggingface.co/lodestones/Chroma"]
