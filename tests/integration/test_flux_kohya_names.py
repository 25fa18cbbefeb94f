"""A Flux LoRA file read the way kohya's networks/lora_flux.py ``create_network_from_weights`` reads it: every key
lands on a module kohya creates, with that module's shapes, so kohya (and tools built on it) consume the whole file.

kohya's reading, restated here (its code is not copied, and its module needs its training stack to import):
  * the file's module names are each key's text before the first dot; a name's rank is its ``lora_down`` weight's
    first dimension and its scale ``alpha``; ``lora_te3`` anywhere means T5-XXL was trained;
  * it creates a LoRA only for names in the file, and only where its own walk finds them: inside each module whose
    class is DoubleStreamBlock or SingleStreamBlock of the Flux model (all blocks: train_blocks defaults to all), and
    among the whole model's Linear/Conv2d whose name contains _img_in, _time_in, _vector_in, _guidance_in or _txt_in;
    in the text encoders inside CLIPAttention/CLIPSdpaAttention/CLIPMLP (CLIP-L, lora_te1) and, when T5 trained,
    T5Attention/T5DenseGatedActDense (lora_te3);
  * a name is ``prefix.`` + the block's path + ``.`` + the layer's path inside it, every ``.`` made ``_``;
  * each LoRA's state is ``lora_down.weight`` (rank x in), ``lora_up.weight`` (out x rank) and ``alpha``; it loads
    the file with strict=False, so a key no module takes would be dropped silently: this test finds such keys.
The modules are ComfyUI's own Flux and CLIP-L, whose paths and class names are BFL's and Hugging Face's, the ones
kohya's models have (docs/architecture.md, fact 14). No T5-XXL can be built at test size: lora_te3 is not covered.
"""
from __future__ import annotations

import pytest
import torch

from fixtures.kiln_nodes import lora_config
from test_train_flux import FLUX_OPTS, FLUX_TRAIN, flux_parts

BLOCK_CLASSES = {"lora_unet": ("DoubleStreamBlock", "SingleStreamBlock"),
                 "lora_te1": ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
                 "lora_te3": ("T5Attention", "T5DenseGatedActDense")}
IN_LAYERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")
LAYER_CLASSES = ("Linear", "Conv2d")


def kohya_names(root: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """name -> layer for every LoRA kohya's walk over ``root`` can create under ``prefix``."""
    def name(*parts: str) -> str:
        return ".".join([prefix, *[p for p in parts if p]]).replace(".", "_")
    found = {}
    for path, block in root.named_modules():
        if type(block).__name__ in BLOCK_CLASSES[prefix]:
            found.update({name(path, sub): layer for sub, layer in block.named_modules()
                          if type(layer).__name__ in LAYER_CLASSES})
    if prefix == "lora_unet":  # the input layers: kohya filters the whole model's layers by these name parts
        found.update({name(path): layer for path, layer in root.named_modules()
                      if type(layer).__name__ in LAYER_CLASSES and any(f in name(path) for f in IN_LAYERS)})
    return found


def read_like_kohya(state: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, torch.Tensor], bool]:
    """(rank per name, alpha per name, whether T5-XXL trained), from the keys as kohya reads them."""
    dims, alphas = {}, {}
    for key, value in state.items():
        name = key.split(".")[0]
        if "alpha" in key:
            alphas[name] = value
        elif "lora_down" in key:
            dims[name] = value.shape[0]
    return dims, alphas, any("lora_te3" in k.split(".")[0] for k in state)


def unconsumed(state: dict[str, torch.Tensor], layers: dict[str, torch.nn.Module]) -> list[str]:
    """The keys kohya's network would not take, or would take with another shape: [] when it consumes the file."""
    dims, alphas, _ = read_like_kohya(state)
    bad = []
    for key, value in state.items():
        name, _, leaf = key.partition(".")
        layer = layers.get(name)
        if layer is None or name not in dims or name not in alphas:
            bad.append(f"{key}: no module kohya creates")
            continue
        w = layer.weight
        fan_in = w.shape[1] * (w[0, 0].numel() if w.dim() == 4 else 1)
        want = {"lora_down.weight": (dims[name], fan_in) if w.dim() == 2 else (dims[name], w.shape[1], *w.shape[2:]),
                "lora_up.weight": (w.shape[0], dims[name]) + ((1, 1) if w.dim() == 4 else ()),
                "alpha": ()}.get(leaf)
        if want is None or tuple(value.shape) != want:
            bad.append(f"{key}: shape {tuple(value.shape)}, kohya's module wants {want}")
    return bad


def clip_l(clip) -> torch.nn.Module:
    """ComfyUI's CLIP-L text model inside the CLIP (kohya's root for lora_te1: Hugging Face's CLIPTextModel)."""
    return next(m for m in clip.cond_stage_model.modules() if type(m).__name__ == "CLIPTextModel")


@pytest.mark.slow
def test_kohya_reads_every_key_of_a_flux_lora_onto_its_own_modules(comfy, flux_model_name, sd1_checkpoint,
                                                                   sd3_checkpoint, dataset_dir):
    model, clip, cached = flux_parts(comfy, flux_model_name("flux-dev"), sd1_checkpoint, sd3_checkpoint, dataset_dir)
    # every kind of name Kiln writes: the blocks at per-type ranks, the five input layers, CLIP-L
    args = "img_attn_dim=3 single_mod_dim=2 in_dims=[2,2,2,2,2]"
    lora = comfy.run_node("KilnTrainFlux", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy, args),
                          **(FLUX_TRAIN | dict(steps=1)), **FLUX_OPTS, text_encoder_lr1=1e-3)[1]
    state = lora.state_dict
    layers = {**kohya_names(model.model.diffusion_model, "lora_unet"), **kohya_names(clip_l(clip), "lora_te1")}
    assert unconsumed(state, layers) == []
    dims, alphas, t5 = read_like_kohya(state)
    assert not t5 and set(dims) == set(alphas)
    assert {n.split("_")[2] if n.startswith("lora_unet_") else "te1" for n in dims} >= \
        {"double", "single", "img", "time", "vector", "guidance", "txt", "te1"}
    assert dims["lora_unet_double_blocks_0_img_attn_qkv"] == 3 and dims["lora_unet_txt_in"] == 2
    assert dims["lora_unet_single_blocks_0_modulation_lin"] == 2 and dims["lora_unet_double_blocks_0_txt_mlp_0"] == 4
    # the check can fail: a key under a name kohya does not create, and one with a wrong shape, are both found
    broken = dict(state)
    broken["lora_unet_final_layer_linear.alpha"] = torch.tensor(4.0)
    broken["lora_unet_txt_in.lora_up.weight"] = broken["lora_unet_txt_in.lora_up.weight"][:, :1]
    assert len(unconsumed(broken, layers)) == 2
