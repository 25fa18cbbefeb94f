"""Train LoRA (Flux) in process on the tiny FLUX.1 dev / schnell and Chroma models (tests/fixtures/tiny_models.py),
conditioned by a stock CLIP-L encode (the SD1 fixture's CLIP), latents from the SD3 fixture's 16-channel VAE.

What this proves about the text side: the CLIP-L path (context and pooled through ComfyUI's own tokenizer and
encode, kohya's one 77-token chunk, text-encoder LoRA lora_te1_) and the guidance handling. No T5-XXL can be built at
test size (ComfyUI fixes it at 4.7B parameters), so T5's token length and lora_te3_ are not exercised here."""
from __future__ import annotations

import logging

import pytest
import torch

from fixtures.kiln_nodes import diffusion_model_parts, kiln_error, lora_config, sample_once
from test_train_sd1 import TRAIN

FLUX_OPTS = dict(timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0,
                 model_prediction_type="raw", guidance_scale=1.0, weighting_scheme="uniform", logit_mean=0.0,
                 logit_std=1.0, mode_scale=1.29, t5xxl_max_token_length=0, apply_t5_attn_mask=False)
FLUX_TRAIN = {k: v for k, v in TRAIN.items() if k != "min_snr_gamma"} | dict(
    steps=6, learning_rate=1e-2, sample_every=0, sample_steps=1, sample_cfg=1.0, seed=3)


def flux_parts(comfy, name, sd1_checkpoint, sd3_checkpoint, dataset_dir):
    """(MODEL, CLIP, cached dataset): the Flux model by Load Diffusion Model, the SD1 fixture's CLIP-L, latents
    cached through the SD3 fixture's 16-channel VAE."""
    return diffusion_model_parts(comfy, name, sd1_checkpoint, sd3_checkpoint, dataset_dir, batch_size=1)


def sample(comfy, model, clip):
    return sample_once(comfy, model, clip)


@pytest.fixture(scope="module")
def flux_dev(comfy, flux_model_name, sd1_checkpoint, sd3_checkpoint, dataset_dir):
    return flux_parts(comfy, flux_model_name("flux-dev"), sd1_checkpoint, sd3_checkpoint, dataset_dir)


@pytest.mark.slow
def test_flux_lora_trains_in_place_with_kohya_names_and_loads_in_stock_load_lora(comfy, flux_dev, caplog):
    model, clip, cached = flux_dev
    net = model.model.diffusion_model
    before = {n: (p, p.data_ptr()) for n, p in net.named_parameters()}
    base = sample(comfy, model, clip)
    import comfy.model_management as mm
    flag = getattr(mm, "in_training", None)
    out = comfy.run_node("KilnTrainFlux", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                         **FLUX_TRAIN, **FLUX_OPTS, text_encoder_lr1=1e-3)
    model_out, lora, samples, _plot, clip_out = out
    meta = lora.metadata
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
    # the input MODEL is the same objects, in the same storage, with nothing left attached; ComfyUI's flag restored
    now = dict(net.named_parameters())
    assert all(now[n] is p and p.data_ptr() == ptr for n, (p, ptr) in before.items())
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in net.modules())
    assert getattr(mm, "in_training", None) == flag
    assert torch.equal(sample(comfy, model, clip), base)
    # kohya's lora_flux names and metadata
    names = {k.split(".")[0] for k in lora.state_dict}
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert unet == {"lora_unet_double_blocks_0_" + s for s in (
        "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
        "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")} | {
        "lora_unet_single_blocks_0_" + s for s in ("linear1", "linear2", "modulation_lin")}
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert (meta["ss_network_module"], meta["ss_base_model_version"], meta["ss_model_type"]) == \
        ("networks.lora_flux", "flux1", "flux")
    assert (meta["ss_guidance_scale"], meta["ss_timestep_sampling"], meta["ss_model_prediction_type"],
            meta["ss_discrete_flow_shift"]) == ("1.0", "sigma", "raw", "3.0")
    # ComfyUI's stock Load LoRA applies every key and the image changes
    with caplog.at_level(logging.WARNING):
        loaded_model, loaded_clip = comfy.run_node("LoraLoader", model=model, clip=clip, lora_name=save(comfy, lora),
                                                   strength_model=1.0, strength_clip=1.0)
        after = sample(comfy, loaded_model, loaded_clip)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not torch.equal(after, base)
    assert torch.allclose(after, sample(comfy, model_out, clip_out), atol=1e-5)
    assert samples.shape == (1, 64, 64, 3)


def save(comfy, lora) -> str:
    comfy.run_node("KilnSaveLora", lora=lora, filename="kiln/flux_test", precision="fp32", overwrite=True)
    return "kiln/flux_test.safetensors"


@pytest.mark.parametrize("opts,args,training_args,words", [
    (dict(apply_t5_attn_mask=True), "", "", ["apply_t5_attn_mask"]),
    ({}, "split_qkv=True", "", ["split_qkv"]),
    ({}, "", "split_mode=true", ["split_mode", "blocks_to_swap"]),
    ({}, "", "min_timestep=100", ["min_timestep"]),
])
def test_flux_refuses_by_name(comfy, flux_dev, opts, args, training_args, words):
    model, clip, cached = flux_dev
    with pytest.raises(Exception) as err:
        comfy.run_node("KilnTrainFlux", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy, args),
                       **(FLUX_TRAIN | dict(steps=1, training_args=training_args)), **(FLUX_OPTS | opts))
    assert all(w in kiln_error(err) for w in words)


@pytest.mark.slow
@pytest.mark.parametrize("variant,arch,guidance", [("flux-schnell", "flux-1-schnell/lora", 1.0),
                                                   ("chroma", "chroma/lora", 0.0)])
def test_schnell_and_chroma_train(comfy, flux_model_name, sd1_checkpoint, sd3_checkpoint, dataset_dir, variant, arch,
                                  guidance):
    model, clip, cached = flux_parts(comfy, flux_model_name(variant), sd1_checkpoint, sd3_checkpoint, dataset_dir)
    if variant == "chroma":
        with pytest.raises(Exception) as err:
            comfy.run_node("KilnTrainFlux", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                           **(FLUX_TRAIN | dict(steps=1)), **(FLUX_OPTS | dict(guidance_scale=1.0)))
        assert "guidance_scale 0" in kiln_error(err)
    out = comfy.run_node("KilnTrainFlux", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                         **(FLUX_TRAIN | dict(steps=3)), **(FLUX_OPTS | dict(guidance_scale=guidance)))
    lora = out[1]
    assert lora.metadata["modelspec.architecture"] == arch
    assert comfy.pack_module("nodes.comfy.model").unmapped_lora_keys(model, lora.state_dict) == []
    names = {k.split(".")[0] for k in lora.state_dict}
    assert ("lora_unet_double_blocks_0_img_mod_lin" in names) == (variant != "chroma")  # Chroma has no modulation


@pytest.mark.slow
def test_cancel_restores_the_model_and_comfyuis_in_training_flag(comfy, flux_dev):
    import importlib
    mm = importlib.import_module("comfy.model_management")
    cutils = importlib.import_module("comfy.utils")
    model, clip, cached = flux_dev
    flag, previous_hook, seen = getattr(mm, "in_training", None), cutils.PROGRESS_BAR_HOOK, []

    def cancel_at_1(value, total, preview=None, prompt_id=None, node_id=None):
        seen.append((value, getattr(mm, "in_training", None)))
        if value == 1:
            mm.interrupt_current_processing(True)  # what the Cancel button does
    cutils.set_progress_bar_global_hook(cancel_at_1)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.run_node("KilnTrainFlux", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                           **(FLUX_TRAIN | dict(steps=50)), **FLUX_OPTS)
    finally:
        mm.interrupt_current_processing(False)
        cutils.set_progress_bar_global_hook(previous_hook)
    if flag is not None:  # ComfyUI >= 0.14 has the flag: set while training, put back after Cancel
        assert seen and all(during for _, during in seen)
    assert getattr(mm, "in_training", None) == flag
    net = model.model.diffusion_model
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in net.modules())
