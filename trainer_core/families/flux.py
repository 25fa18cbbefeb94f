"""FLUX.1 (dev, schnell) and Chroma: kohya's flux_train_network options on ComfyUI's Flux.

Objective (kohya's library/flux_train_utils.py): x_t = (1 − σ)·x0 + σ·ε, target ε − x0 (the network's raw output is
the velocity), σ drawn by ``timestep_sampling``:
  * sigma: u from the weighting scheme's density, snapped to kohya's 1000-step FlowMatchEulerDiscrete schedule
    σ_i = shift((1000 − i) / 1000), i = ⌊u·1000⌋, with discrete_flow_shift;
  * uniform: σ ~ U(0, 1); sigmoid: σ = sigmoid(sigmoid_scale·n), n ~ N(0, 1);
  * shift: the sigmoid draw, then shifted by discrete_flow_shift;
  * flux_shift: the sigmoid draw, then FLUX.1's resolution-dependent shift: μ = 0.5 + (1.15 − 0.5)·(L − 256)/(4096 −
    256) with L = (h/2)·(w/2) the packed image tokens, σ ← e^μ / (e^μ + 1/σ − 1).
The prediction is read by ``model_prediction_type`` (raw, additive, sigma_scaled: weighted by weighting_scheme), and
the network is called with ComfyUI's timestep for σ (σ itself for Flux) and the run's ``guidance_scale`` (never the
3.5 ComfyUI puts in a conditioning by default).

LoRA layout (kohya's networks/lora_flux.py; ComfyUI's module paths are BFL's, so the names map directly): every
Linear of the double blocks (img/txt attention qkv and proj, MLP, modulation) and single blocks (linear1, linear2,
modulation), ``lora_unet_double_blocks_0_img_attn_qkv``; per-type ranks (img_attn_dim, ..., single_mod_dim; 0 =
none), the five input layers' ranks (in_dims), block selections (train_blocks, train_double_block_indices,
train_single_block_indices). Text encoders: CLIP-L ``lora_te1_``, T5-XXL ``lora_te3_`` (kohya: train_t5xxl=True).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import KilnError
from ..lora.network_args import block_selection, bool_arg, int_arg, int_list_arg
from ..lora.targets import TargetRule
from .flow import FlowObjective, sample_u, shift_u

UNET_PREFIX = "lora_unet"
TE_PREFIXES = {"clip_l": "lora_te1", "t5xxl": "lora_te3"}  # kohya's lora_flux names
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
SCHEDULE_STEPS = 1000  # kohya's FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)

# type_dims, in kohya's order of precedence: the first whose words all occur in the module's kohya name sets its rank
TYPE_DIMS = {
    "img_attn_dim": ("img_attn",), "txt_attn_dim": ("txt_attn",), "img_mlp_dim": ("img_mlp",),
    "txt_mlp_dim": ("txt_mlp",), "img_mod_dim": ("img_mod",), "txt_mod_dim": ("txt_mod",),
    "single_dim": ("single_blocks", "linear"), "single_mod_dim": ("modulation",),
}
IN_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")  # in_dims, in kohya's order
NETWORK_ARGS = {
    **{k: f"rank of the {' '.join(w)} layers (default: the LoRA rank; 0 = none)" for k, w in TYPE_DIMS.items()},
    "in_dims": "five ranks for img_in, time_in, vector_in, guidance_in, txt_in (default: none)",
    "train_blocks": "all, single or double: which kind of block gets LoRA",
    "train_double_block_indices": "double blocks that get LoRA: all, none, or e.g. 0,1,4-5",
    "train_single_block_indices": "single blocks that get LoRA: all, none, or e.g. 0-10,20",
    "train_t5xxl": "True: T5-XXL gets LoRA too (lora_te3_, at text_encoder_lr3)",
    "split_qkv": "refused: kohya's split_qkv trains q, k, v as separate LoRAs (not supported; kohya's default is "
                 "False)",
}

# kohya Flux options Kiln refuses, with the reason and what to use (the Train node and cli.py --config say the same)
REFUSED = {
    "split_mode": "it is obsolete in kohya's flux_train_network: use blocks_to_swap instead (kohya sets "
                  "blocks_to_swap=18 for it)",
    "apply_t5_attn_mask": "it is not supported for Flux yet: kohya masks T5's padding in the T5 encode and in the "
                          "double blocks' attention, and ComfyUI's Flux text encoder encodes T5 without a mask. Turn "
                          "it off",
}


# --- objective ------------------------------------------------------------------------------------

def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """FLUX.1's schedule shift (BFL's time_shift with exponent 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def flux_mu(height: int, width: int) -> float:
    """FLUX.1's shift for an image of these latent sizes: linear in its packed token count, 0.5 at 256 tokens and
    1.15 at 4096 (kohya: get_lin_function(y1=0.5, y2=1.15) of (h // 2)·(w // 2))."""
    tokens = (height // 2) * (width // 2)
    return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)


def draw_sigma(timestep_sampling: str = "sigma", sigmoid_scale: float = 1.0, discrete_flow_shift: float = 3.0,
               weighting_scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
               mode_scale: float = 1.29):
    """kohya's get_noisy_model_input_and_timesteps: σ per sample for a batch of latents shaped ``shape``."""
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")

    def draw(n: int, generator: torch.Generator, shape: tuple) -> torch.Tensor:
        if timestep_sampling == "uniform":
            return torch.rand(n, generator=generator, dtype=torch.float64)
        if timestep_sampling == "sigma":
            u = sample_u(weighting_scheme, n, generator, logit_mean, logit_std, mode_scale)
            i = (u * SCHEDULE_STEPS).long().clamp(0, SCHEDULE_STEPS - 1)
            return shift_u((SCHEDULE_STEPS - i).double() / SCHEDULE_STEPS, discrete_flow_shift)
        s = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator, dtype=torch.float64))
        if timestep_sampling == "shift":
            return shift_u(s, discrete_flow_shift)
        if timestep_sampling == "flux_shift":
            return time_shift(flux_mu(shape[-2], shape[-1]), s)
        return s
    return draw


def objective(opts: dict, timestep) -> FlowObjective:
    """The Flux objective from the node's (kohya's) options and ComfyUI's timestep for σ."""
    draw = draw_sigma(opts["timestep_sampling"], opts["sigmoid_scale"], opts["discrete_flow_shift"],
                      opts["weighting_scheme"], opts["logit_mean"], opts["logit_std"], opts["mode_scale"])
    return FlowObjective(draw, timestep, target="velocity", prediction=opts["model_prediction_type"],
                         weighting=opts["weighting_scheme"])


# --- LoRA layout ----------------------------------------------------------------------------------

def unet_namer(path: str) -> str:
    return f"{UNET_PREFIX}_{path.replace('.', '_')}"


def rules(args: dict[str, str], rank: int, alpha: float, double: int, single: int, node: str) -> list[TargetRule]:
    """kohya's lora_flux selection as target rules: every Linear of the chosen blocks at the LoRA rank unless its
    type's *_dim says otherwise, plus the input layers in_dims names."""
    if bool_arg(args, "split_qkv"):
        raise KilnError(f"{node}: network_args split_qkv=True is not supported: kohya's split_qkv trains q, k and v "
                        f"as separate LoRAs inside one file entry; Kiln trains the fused qkv (kohya's default). "
                        f"Remove split_qkv.")
    kinds = args.get("train_blocks", "all")
    if kinds not in ("all", "single", "double"):
        raise KilnError(f"{node}: network_args train_blocks must be all, single or double, got {kinds!r}.")
    dims = {k: int_arg(args, k, None) for k in TYPE_DIMS}
    chosen = {"double": block_selection(args.get("train_double_block_indices"), double) if kinds != "single"
              else [False] * double,
              "single": block_selection(args.get("train_single_block_indices"), single) if kinds != "double"
              else [False] * single}
    out = []
    for kind, on in chosen.items():
        for i, selected in enumerate(on):
            prefix = f"{kind}_blocks\\.{i}\\."
            if not selected:
                out.append(TargetRule(prefix + ".*", ("linear", "conv1x1"), 0, alpha))
                continue
            for key, words in TYPE_DIMS.items():
                if dims[key] is not None:
                    out.append(TargetRule(prefix + _words_pattern(kind, i, words), ("linear",), dims[key], alpha))
            out.append(TargetRule(prefix + ".*", ("linear", "conv1x1"), rank, alpha))
    for layer, r in zip(IN_LAYERS, int_list_arg(args, "in_dims", 5) or [0] * 5):
        out.append(TargetRule(rf"{layer}(\..*)?", ("linear",), r, alpha))
    return out


def _words_pattern(kind: str, index: int, words: tuple) -> str:
    """The path regex (inside a block) of modules whose kohya name holds every one of ``words``."""
    name_words = [w for w in words if w not in (f"{kind}_blocks",)]
    if kind == "double" and "single_blocks" in words:
        return "(?!)"  # never: single_dim is about single blocks
    return "".join(f"(?=.*{w.replace('_', '[._]')})" for w in name_words) + ".*"


def check_shape(network: nn.Module) -> tuple[int, int]:
    """(double, single) block counts of ComfyUI's Flux/Chroma network."""
    return len(network.double_blocks), len(network.single_blocks)


def checkpoint_blocks(network: nn.Module) -> list[nn.Module]:
    """The unit of gradient checkpointing and block swap: double blocks, then single blocks, in the order they run.
    blocks_to_swap N swaps the last N of them, as kohya's Flux swaps N blocks counted over both kinds (a double block
    weighs about twice a single one; kohya's split is approximate, this is exact by count)."""
    return list(network.double_blocks) + list(network.single_blocks)


def swap_blocks(network: nn.Module, count: int) -> list[nn.Module]:
    """kohya's split of blocks_to_swap N (flux_models.enable_block_swap): N // 2 double blocks and twice the rest in
    single blocks (a double block weighs about two single ones), the last ones of each kind, capped at what the model
    has; in the order they run."""
    double, single = list(network.double_blocks), list(network.single_blocks)
    d = min(count // 2, len(double))
    s = min((count - count // 2) * 2, len(single))
    return double[len(double) - d:] + single[len(single) - s:]


# --- names and metadata ---------------------------------------------------------------------------

def base_model_version(model_config: str) -> str:
    """kohya's ss_base_model_version (library/flux_utils.py MODEL_VERSION_*): "flux1" for FLUX.1 dev and schnell,
    "chroma" for Chroma."""
    return "chroma" if model_config == "Chroma" else "flux1"


def model_type(model_config: str) -> str:
    """kohya's ss_model_type (--model_type): flux or chroma."""
    return "chroma" if model_config == "Chroma" else "flux"


def modelspec_implementation(model_config: str) -> str:
    """kohya's library/sai_model_spec.py names the model's own code for Flux: BFL's repository for FLUX.1 dev and
    schnell, lodestones' for Chroma."""
    return ("https://huggingface.co/lodestones/Chroma" if model_config == "Chroma"
            else "https://github.com/black-forest-labs/flux")


def modelspec_architecture(model_config: str) -> str:
    """kohya's library/sai_model_spec.py: "flux-1-dev/lora", "flux-1-schnell/lora", "chroma/lora"."""
    return {"FluxSchnell": "flux-1-schnell", "Chroma": "chroma"}.get(model_config, "flux-1-dev") + "/lora"
