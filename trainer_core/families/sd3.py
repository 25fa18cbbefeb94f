"""SD3 / SD3.5: rectified flow on the MMDiT, with kohya's timestep sampling, loss weighting and LoRA layout.

Objective (kohya's sd3_train_network, itself the diffusers SD3 recipe; flow.FlowObjective with SD3's draw):
  u ~ weighting_scheme (uniform | logit_normal(logit_mean, logit_std) | mode(mode_scale)), shifted by
  training_shift as u·s / (1 + (s−1)·u); t = ⌊u·(t_max − t_min) + t_min⌋, σ = t / 1000;
  x_t = (1 − σ)·x0 + σ·ε. The network predicts the velocity ε − x0; like kohya the loss compares the
  implied x0 = x_t − σ·v̂ with x0, weighted per sample by cosmap or sigma_sqrt (else 1).

LoRA layout: kohya's lora_sd3 names (``lora_unet_`` + MMDiT module path), per-layer ranks for the six
(context|x) × (attn|mlp|mod) groups, six embedding ranks and a block selection.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from ..lora.network_args import block_selection, bool_arg, int_arg, int_list_arg
from ..lora.targets import TargetRule
from .flow import WEIGHTING_SCHEMES, FlowObjective, loss_weight, per_mille, sample_u, shift_u  # noqa: F401

UNET_PREFIX = "lora_unet"
TE_PREFIXES = {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5xxl": "lora_te3"}  # kohya's lora_sd3 names

# network_args this family reads (kohya's lora_sd3 keys), with what they do
NETWORK_ARGS = {
    "context_attn_dim": "rank of context_block attn qkv/proj (default: the LoRA rank; 0 = none)",
    "context_mlp_dim": "rank of context_block mlp fc1/fc2 (default: the LoRA rank)",
    "context_mod_dim": "rank of context_block adaLN modulation (default: the LoRA rank)",
    "x_attn_dim": "rank of x_block attn (and SD3.5 attn2) qkv/proj (default: the LoRA rank)",
    "x_mlp_dim": "rank of x_block mlp fc1/fc2 (default: the LoRA rank)",
    "x_mod_dim": "rank of x_block adaLN modulation (default: the LoRA rank)",
    "attention_only": "True: MLP and modulation default to 0, attention alone (Kiln 0.2's default; kohya writes "
                      "the four *_mlp_dim / *_mod_dim = 0 for it)",
    "emb_dims": "six ranks: context_embedder, t_embedder, x_embedder, y_embedder, final_layer adaLN, final_layer linear",
    "train_block_indices": "joint blocks that get LoRA: all, none, or e.g. 0,1,4-5,7",
}
# group -> (block part, regex of the module inside that part)
_GROUPS = {
    "context_attn_dim": ("context_block", r"attn2?\.(qkv|proj)"),
    "context_mlp_dim": ("context_block", r"mlp\.fc[12]"),
    "context_mod_dim": ("context_block", r"adaLN_modulation\.1"),
    "x_attn_dim": ("x_block", r"attn2?\.(qkv|proj)"),
    "x_mlp_dim": ("x_block", r"mlp\.fc[12]"),
    "x_mod_dim": ("x_block", r"adaLN_modulation\.1"),
}
_EMBEDDERS = (r"context_embedder", r"t_embedder\.mlp\.[02]", r"x_embedder\.proj", r"y_embedder\.mlp\.[02]",
              r"final_layer\.adaLN_modulation\.1", r"final_layer\.linear")


@dataclass(frozen=True)
class SD3LayerRanks:
    """Which MMDiT layers get LoRA and at which rank (kohya's lora_sd3 network_args)."""
    group_dims: dict = field(default_factory=dict)   # _GROUPS key -> rank (0 = none)
    emb_dims: tuple = (0, 0, 0, 0, 0, 0)
    blocks: tuple = ()                               # bool per joint block

    @classmethod
    def from_args(cls, args: dict[str, str], rank: int, depth: int) -> "SD3LayerRanks":
        """kohya's lora_sd3: every Linear of both streams (attention, MLP, modulation) gets network_dim unless its
        group's *_dim says otherwise (0 = none); ``attention_only=True`` makes MLP and modulation default to 0."""
        attention_only = bool_arg(args, "attention_only")
        dims = {k: int_arg(args, k, rank if k.endswith("attn_dim") or not attention_only else 0) for k in _GROUPS}
        emb = int_list_arg(args, "emb_dims", 6) or [0] * 6
        blocks = block_selection(args.get("train_block_indices"), depth)
        return cls(dims, tuple(emb), tuple(blocks))

    def rules(self, alpha: float) -> list[TargetRule]:
        """Target rules over the MMDiT's module paths; one alpha for every rank, as in kohya."""
        chosen = "|".join(str(i) for i, on in enumerate(self.blocks) if on)
        rules = []
        if chosen:
            for key, (part, inner) in _GROUPS.items():
                rules.append(TargetRule(rf"joint_blocks\.({chosen})\.{part}\.{inner}", ("linear",), self.group_dims[key], alpha))
        for pattern, rank in zip(_EMBEDDERS, self.emb_dims):
            rules.append(TargetRule(pattern, ("linear", "conv1x1", "conv3x3"), rank, alpha))
        return rules


def unet_namer(path: str) -> str:
    return f"{UNET_PREFIX}_{path.replace('.', '_')}"


def depth_of(mmdit: nn.Module) -> int:
    return len(mmdit.joint_blocks)


def checkpoint_blocks(mmdit: nn.Module) -> list[nn.Module]:
    return list(mmdit.joint_blocks)


def model_type(mmdit: nn.Module) -> str:
    """kohya's SD3 model type (library/sd3_utils.py load_mmdit), its ss_base_model_version: with q/k norms it is SD3.5,
    "5-medium" when x-blocks have their own self-attention, else "5-large"; without them SD3 "medium"."""
    qk_norm = not isinstance(getattr(mmdit.joint_blocks[0].x_block.attn, "ln_q", nn.Identity()), nn.Identity)
    if not qk_norm:
        return "medium"
    return "5-medium" if any(getattr(b.x_block, "x_block_self_attn", False) for b in mmdit.joint_blocks) else "5-large"


def modelspec_architecture(mmdit: nn.Module) -> str:
    """kohya's names (library/sai_model_spec.py: "stable-diffusion-3-" + the model type; the ModelSpec standard lists
    no SD3 ids)."""
    return f"stable-diffusion-3-{model_type(mmdit)}/lora"


# --- objective ------------------------------------------------------------------------------------

def draw_sigma(scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
               training_shift: float = 1.0, min_timestep: int = 0, max_timestep: int = 1000):
    """kohya's SD3 draw: u from the weighting scheme's density, shifted, onto an integer timestep in
    [min_timestep, max_timestep); σ = t / 1000."""
    def draw(n: int, generator: torch.Generator, shape: tuple) -> torch.Tensor:
        u = shift_u(sample_u(scheme, n, generator, logit_mean, logit_std, mode_scale), training_shift)
        return (u * (max_timestep - min_timestep) + min_timestep).long().double() / 1000
    return draw


class SD3Objective(FlowObjective):
    """SD3's flow objective (kohya's sd3_train_network): the implied x0 = x_t − σ·v̂ compared with x0, weighted per
    sample by cosmap or sigma_sqrt; the network called with ComfyUI's timestep for σ (σ·1000 for SD3)."""

    def __init__(self, weighting_scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, training_shift: float = 1.0, min_timestep: int = 0, max_timestep: int = 1000,
                 timestep=per_mille):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
        super().__init__(draw_sigma(weighting_scheme, logit_mean, logit_std, mode_scale, training_shift, min_timestep,
                                    max_timestep), timestep, target="x0", prediction="sigma_scaled",
                         weighting=weighting_scheme)


# --- text-encoder outputs -------------------------------------------------------------------------

@dataclass(frozen=True)
class TextLayout:
    """Where each text encoder sits in ComfyUI's SD3 conditioning: context = [CLIP-L|CLIP-G|0] over the first
    ``clip_tokens`` tokens (channels 0:768 and 768:2048), then T5; pooled = [CLIP-L 768 | CLIP-G 1280]."""
    clip_tokens: int  # 77 when a CLIP encoder is loaded, else 0

    def drop(self, context: torch.Tensor, pooled: torch.Tensor, which: str) -> None:
        """Zero one encoder's outputs in place (kohya's clip_l/clip_g/t5 dropout)."""
        c = self.clip_tokens
        if which == "clip_l":
            context[:c, :768] = 0
            pooled[:768] = 0
        elif which == "clip_g":
            context[:c, 768:2048] = 0
            pooled[768:2048] = 0
        elif which == "t5":
            context[c:] = 0


def mask_padding(context: torch.Tensor, layout: TextLayout, clip_len: int, t5_len: int, lg: bool, t5: bool) -> torch.Tensor:
    """kohya's apply_lg_attn_mask / apply_t5_attn_mask: outputs at padding positions set to zero."""
    out = context.clone()
    if lg and layout.clip_tokens:
        out[clip_len:layout.clip_tokens] = 0
    if t5:
        out[layout.clip_tokens + t5_len:] = 0
    return out


def drop_encoders(context: torch.Tensor, pooled: torch.Tensor, layout: TextLayout, rates: dict[str, float],
                  rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, each encoder's output is zeroed with its dropout rate (one draw per encoder, in a fixed order)."""
    draws = {name: rng.random() < rate for name, rate in rates.items() if rate > 0}
    if not any(draws.values()):
        return context, pooled
    context, pooled = context.clone(), pooled.clone()
    for name, dropped in draws.items():
        if dropped:
            layout.drop(context, pooled, name)
    return context, pooled
