"""MODEL: family checks, the sampling schedule, training sessions on the shared model, the LoRA back in.

MODEL is a ``comfy.model_patcher.ModelPatcher``; the network is ``model.model.diffusion_model``
(docs/architecture.md, fact 2).
Other nodes share that object, so after training it must behave exactly as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass

import torch

import comfy.lora
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_sampling
import comfy.sd
import comfy.utils

from ...trainer_core.errors import KilnError
from ...trainer_core.families import layer
from . import compat
from . import private as private_model
from .tensors import autograd_views, fingerprint, fingerprint_patches, norm_input_copies


# ComfyUI model_config class names per Kiln train node (the family layer's data)
SD1_FAMILIES = layer.FAMILIES["sd1"].model_configs
SDXL_FAMILIES = layer.FAMILIES["sdxl"].model_configs
SD3_FAMILIES = layer.FAMILIES["sd3"].model_configs
FLUX_FAMILIES = layer.FAMILIES["flux"].model_configs
NODE_FOR_FAMILY = layer.NODE_FOR_MODEL_CONFIG


# --- identity and schedule ------------------------------------------------------------------------------

def model_family(model) -> str:
    return type(model.model.model_config).__name__


def preset_node(model) -> str | None:
    """The Train node whose family preset covers this MODEL, if any."""
    return NODE_FOR_FAMILY.get(model_family(model))


def require_family(model, allowed: tuple[str, ...] | None, node: str) -> str:
    fam = model_family(model)
    if allowed is not None and fam not in allowed:  # None: any family (Train LoRA (any model))
        hint = NODE_FOR_FAMILY.get(fam)
        use = f"use the {hint} node instead" if hint else "it has no preset yet: use Train LoRA (any model)"
        raise KilnError(f"{node} got a {fam} model: {use}. ({node} trains {', '.join(allowed[:3])} models.)")
    return fam


def model_sampling(model):
    """The sampling object in effect, including one patched in by ModelSamplingDiscrete (v-prediction, zsnr)."""
    return model.get_model_object("model_sampling")


def prediction_type(model, node: str) -> str:
    """"eps" or "v" for the DDPM families, from the model's sampling type; anything else is refused."""
    ms = model_sampling(model)
    # ComfyUI composes the sampling class from a schedule (an nn.Module) and a prediction mixin (EPS and its
    # subclasses V_PREDICTION, X0, LCM...): the first such mixin in the MRO is what the model predicts
    mixin = next((c for c in type(ms).__mro__ if issubclass(c, comfy.model_sampling.EPS)
                  and not issubclass(c, torch.nn.Module)), None)
    discrete = isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
    if discrete and mixin is comfy.model_sampling.V_PREDICTION:
        return "v"
    if discrete and mixin is comfy.model_sampling.EPS:
        return "eps"
    kind = mixin.__name__ if mixin else type(ms).__name__
    raise KilnError(f"{node}: this model samples as {kind}; Kiln trains epsilon or v-prediction "
                    f"models with a discrete schedule. Remove the sampling patch (e.g. ModelSamplingDiscrete set to "
                    f"lcm/x0) before the Train node.")


def sampling(model, node: str) -> layer.Sampling:
    """ComfyUI's model sampling in effect (a ModelSamplingDiscrete/SD3/Flux patch included) as the family layer's
    plain data: the parameterisation, the DDPM σ table, or the flow timestep ComfyUI calls the network with."""
    ms = model_sampling(model)
    if isinstance(ms, comfy.model_sampling.CONST):  # rectified flow (SD3's discrete flow, Flux's shifted schedule)
        one = float(ms.timestep(torch.tensor(1.0, dtype=torch.float64)))
        return layer.Sampling("flow", multiplier=one, shift=float(getattr(ms, "shift", 1.0)), timestep=ms.timestep)
    return layer.Sampling(prediction_type(model, node), sigmas=ms.sigmas.detach().double().cpu())


def alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t from the model's own discrete schedule (ComfyUI stores σ_t = √((1−ᾱ_t)/ᾱ_t)); follows a patched
    schedule too (zsnr)."""
    sigmas = model_sampling(model).sigmas.detach().double().cpu()
    return 1.0 / (1.0 + sigmas ** 2)


def latent_in(model):
    """Raw VAE latents -> the latent space the network was trained in (scale/shift)."""
    fmt = model.model.latent_format
    return lambda z: fmt.process_in(z)


def device_of(model) -> torch.device:
    return torch.device(model.load_device)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def weight_dtype(model) -> torch.dtype:
    """The dtype ComfyUI holds the diffusion model's weights in (fp8 when loaded so), not the one it computes in."""
    return model.model.get_dtype()


def check_fp8_base(model, node: str, key: str) -> None:
    """kohya's fp8_base(_unet) asks for fp8 base weights; in ComfyUI the loader decides, so say which one to use."""
    dtype = weight_dtype(model)
    if dtype not in FP8_DTYPES:
        raise KilnError(f"{node}: training_args {key} asks for fp8 base weights, but this MODEL holds them as "
                        f"{str(dtype).replace('torch.', '')}. In ComfyUI the loader chooses: load the model with Load "
                        f"Diffusion Model (UNETLoader) and weight_dtype fp8_e4m3fn, or start ComfyUI with "
                        f"--fp8_e4m3fn-unet (cli.py does so for a kohya config with {key}); or remove {key}.")


def default_precision(model) -> str:
    """bf16 autocast where the device supports it, else fp32 (CPU, old GPUs)."""
    dev = device_of(model)
    if dev.type == "cuda" and comfy.model_management.should_use_bf16(dev):
        return "bf16"
    return "fp32"


# --- training on the shared, inference-mode model ---------------------------------------------------------

@dataclass
class TrainingTarget:
    """What a training run computes with: ``patcher`` samples the previews, ``network`` (its diffusion model)
    carries the adapters. ``patcher`` is the input MODEL itself, or its non-dynamic copy under dynamic VRAM
    (``note`` then says so and what it cost)."""
    patcher: object
    network: torch.nn.Module
    note: str | None = None


def trainable_patcher(model, node: str, private: bool = False) -> tuple[object, str | None]:
    """The patcher a run trains through: the input MODEL (weights used in place, no copy) unless ComfyUI stages
    its weights per layer (dynamic VRAM), or ``private`` asks for a re-loaded copy."""
    dynamic = compat.is_dynamic(model)
    if not (dynamic or private):
        return model, None
    why = private_model.DYNAMIC if dynamic else "a private copy was asked for"
    return private_model.private_patcher(model, "MODEL", node, why)


@contextlib.contextmanager
def training_session(model, node: str, private: bool = False, copy_norm_inputs: bool = False):
    """Load the MODEL to train through (with its own patches, e.g. an upstream LoRA) fully on its device and
    make its network trainable-through for the duration; yields a TrainingTarget. Meanwhile ComfyUI's
    ``in_training`` is set (backward-safe kernels, compat.in_training) and, with ``copy_norm_inputs`` (networks
    that add residuals in place, such as Flux's blocks), every LayerNorm gets a copy of its input while gradients
    are on (tensors.norm_input_copies); both are undone on the way out, also on an error or Cancel."""
    patcher, note = trainable_patcher(model, node, private)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    unet = patcher.model.diffusion_model
    copies = norm_input_copies(unet) if copy_norm_inputs else contextlib.nullcontext()
    with compat.in_training(), copies, torch.inference_mode(False), autograd_views(unet):
        yield TrainingTarget(patcher, unet, note)


CONST_COND = "const:"  # cond key prefix: a CONDConstant's number carried as a 0-d tensor (text.ModelConditioning)


def unet_forward(model, unet, dtype: torch.dtype | None = None):
    """fn(x_t, t, cond) for the diffusion network (compvis UNet, MMDiT, Flux): the call ComfyUI's _apply_model
    makes, with ``t`` in the model's own timestep units (DDPM index, or σ·1000 for flow models). Inputs go in
    the model's compute dtype, or ``dtype`` (a fully fine-tuned network computes with its float32 weights)."""
    dtype = dtype or model.model.manual_cast_dtype or model.model.get_dtype()

    def forward(x_t, timesteps, cond):
        # every other cond is a keyword of the forward (SDXL/SD3/Flux: y, Flux: guidance; any model: what its
        # extra_conds gave), cast as ComfyUI's _apply_model casts them (floats to the compute dtype, integers kept);
        # c_concat goes onto the latents' channels, a constant (CONST_COND) back to its number
        extra = {}
        for k, v in cond.items():
            if k.startswith(CONST_COND):
                extra[k[len(CONST_COND):]] = v.item()
            elif k not in ("context", "c_concat"):
                extra[k] = v.to(dtype) if v.is_floating_point() else v
        x = torch.cat([x_t, cond["c_concat"].to(x_t)], dim=1) if "c_concat" in cond else x_t
        return unet(x.to(dtype), timesteps, context=cond["context"].to(dtype), **extra)
    return forward


@contextlib.contextmanager
def random_pos_embed_crop(mmdit, rate: float, seed: int):
    """SD3.5's pos_emb_random_crop_rate (kohya): while gradients are on (training steps, not the probe or
    previews), the MMDiT's position-embedding crop is taken at a random offset with probability ``rate``
    instead of the centre. Installed as an instance attribute over ComfyUI's method and removed after."""
    if rate <= 0 or getattr(mmdit, "pos_embed", None) is None:
        yield
        return
    rng = random.Random(seed)
    centred = mmdit.cropped_pos_embed
    size = mmdit.pos_embed_max_size

    def cropped(hw, device=None):
        if not torch.is_grad_enabled() or rng.random() >= rate:
            return centred(hw, device=device)
        p = mmdit.x_embedder.patch_size[0]
        h, w = (hw[0] + 1) // p, (hw[1] + 1) // p
        top, left = rng.randint(0, size - h), rng.randint(0, size - w)
        grid = mmdit.pos_embed.reshape(1, size, size, -1)[:, top:top + h, left:left + w, :]
        return grid.reshape(1, h * w, -1).to(device)

    mmdit.cropped_pos_embed = cropped
    try:
        yield
    finally:
        del mmdit.__dict__["cropped_pos_embed"]


# --- the trained LoRA back into ComfyUI --------------------------------------------------------------------

def apply_lora(model, clip, kohya_sd: dict[str, torch.Tensor], strength: float = 1.0):
    """Clones of MODEL and CLIP with the LoRA patched in exactly as ComfyUI's LoraLoader would (under dynamic
    VRAM too: the patches apply to the input's own dynamic patcher, not to the training copy)."""
    return comfy.sd.load_lora_for_models(model, clip, kohya_sd, strength, strength)


def unmapped_lora_keys(model, kohya_sd: dict[str, torch.Tensor], clip=None) -> list[str]:
    """LoRA module names ComfyUI cannot map onto this model (and CLIP, when given): should be none."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    names = {k.rsplit(".alpha", 1)[0] for k in kohya_sd if k.endswith(".alpha")}  # every algorithm writes alpha
    return sorted(n for n in names if n not in key_map)


# --- fully fine-tuned weights back into ComfyUI (DreamBooth) ------------------------------------------------

METADATA_OPTION = "kiln_checkpoint_metadata"  # model_options key: the training metadata Save Checkpoint writes


def apply_weights(model, clip, unet_sd: dict[str, torch.Tensor], clip_sd: dict[str, torch.Tensor],
                  metadata: dict[str, str]):
    """Clones of MODEL (and CLIP, when ``clip_sd`` has weights) whose weights are the trained ones: ComfyUI "set"
    weight patches (keys as in ``model.model``'s / the CLIP model's state dict), applied by ComfyUI whenever the
    clone is loaded and taken off again for the input MODEL, exactly like a LoRA's patches. ``metadata`` rides
    along in the clone's model_options for Kiln's Save Checkpoint."""
    model_out = model.clone()
    missing = [k for k in unet_sd if k not in model_out.add_patches({k: ("set", (t,)) for k, t in unet_sd.items()})]
    model_out.model_options[METADATA_OPTION] = dict(metadata)
    clip_out = clip
    if clip_sd:
        clip_out = clip.clone()
        missing += [k for k in clip_sd if k not in clip_out.add_patches({k: ("set", (t,)) for k, t in clip_sd.items()})]
    if missing:  # a bug if it ever happens: a trained weight ComfyUI would not apply
        raise KilnError(f"{len(missing)} trained weights do not map onto the model, e.g. {missing[0]}")
    return model_out, clip_out


def model_identity(model) -> str:
    """A stable id of what a MODEL samples: the diffusion model's weights, the patches on top (an upstream LoRA)
    and its type and prediction (a ModelSamplingDiscrete patch in front changes it)."""
    h = hashlib.sha256()
    sd = model.model.diffusion_model.state_dict()
    for k in sorted(sd):
        fingerprint(h, k, sd[k])
    fingerprint_patches(h, model.patches)
    sampling = model.get_model_object("model_sampling")
    h.update(f"{type(model.model).__name__}|{model.model.model_type}|{type(sampling).__name__}|"
             f"{getattr(sampling, 'zsnr', False)}".encode())
    return h.hexdigest()[:16]


def checkpoint_weights(model, path: str) -> dict[str, torch.Tensor]:
    """A full checkpoint's UNet and text-encoder weights keyed the way the loaded ``model`` and its CLIP name
    their modules ("diffusion_model.*", "clip_l.*"): converted by the model config's own loading functions, as
    Load Checkpoint converts them."""
    sd = comfy.utils.load_torch_file(path)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = model.model.model_config
    unet = config.process_unet_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return {**{f"diffusion_model.{k}": v for k, v in unet.items()}, **config.process_clip_state_dict(dict(sd))}


def checkpoint_state_dict(model, clip, vae, in_place: bool = False,
                          dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a full checkpoint the way ComfyUI's own Save Checkpoint assembles it: the MODEL
    and CLIP loaded with their patches written into the weights, the VAE's own, each renamed by the model
    config to the original checkpoint layout (model.diffusion_model.*, cond_stage_model.*, first_stage_model.*),
    the v_pred marker and modelspec.predict_key; plus the training metadata Kiln trained it with.
    ``in_place``: the weights are read as they are now (a training run's intermediate save), and float32 ones
    are stored as ``dtype`` when given (the dtype the model was loaded in)."""
    if not in_place:
        comfy.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = compat.checkpoint_tensors(model, clip, vae.get_sd())
    sd = {k: t.detach().to("cpu", dtype=dtype if dtype and t.dtype == torch.float32 else t.dtype).contiguous()
          for k, t in sd.items()}
    meta = dict(model.model_options.get(METADATA_OPTION, {}))
    kind = model.model.model_type
    if kind == comfy.model_base.ModelType.V_PREDICTION:
        meta["modelspec.predict_key"] = "v"
        sd["v_pred"] = torch.tensor([])
        if getattr(model_sampling(model), "zsnr", False):
            sd["ztsnr"] = torch.tensor([])
    elif kind == comfy.model_base.ModelType.EPS:
        meta["modelspec.predict_key"] = "epsilon"
    return sd, meta
