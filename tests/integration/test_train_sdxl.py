"""Train SDXL in process on the SDXL-family checkpoint that ComfyUI's loader detects (KOALA_700M-shaped UNet,
full-size CLIP-L/G)."""
from __future__ import annotations


import pytest
import torch

from fixtures.kiln_nodes import comfy_model, lora_config
from test_train_sd1 import TRAIN, load_and_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl(comfy, sdxl_checkpoint, dataset_dir):
    return load_and_cache(comfy, sdxl_checkpoint, dataset_dir)


def test_sdxl_unet_lora_learns_and_maps(comfy, sdxl):
    model, clip, cached = sdxl
    assert type(model.model.model_config).__name__ == "KOALA_700M"
    unet = model.model.diffusion_model
    before = {n: (p, p.data_ptr()) for n, p in unet.named_parameters()}
    out = comfy.run_node("KilnTrainSDXL", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                         **(TRAIN | dict(steps=20, learning_rate=3e-3, sample_every=0, sample_steps=2)))
    sd, meta = out[1].state_dict, out[1].metadata
    names = {k.split(".")[0] for k in sd}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in names  # SGM names, as kohya's SDXL
    assert all(n.startswith("lora_unet_") for n in names)
    assert comfy_model(comfy).unmapped_lora_keys(model, sd) == []
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert float(meta["kiln_probe_loss_end"]) < 0.9 * float(meta["kiln_probe_loss_start"])
    now = dict(unet.named_parameters())
    assert all(now[n] is p and p.data_ptr() == ptr for n, (p, ptr) in before.items())
    assert out[2].shape == (1, 64, 64, 3)


def test_sdxl_text_encoder_lora_names_map_for_both_encoders(comfy, sdxl):
    """te1/te2 adapters over every layer of the real CLIP-L/G get kohya's names, and ComfyUI's LoRA key map
    (what LoraLoader uses) knows every one."""
    from trainer_core.families import sdxl as family
    from trainer_core.lora.network import LoRANetwork
    from trainer_core.lora.text_encoders import te_namer, te_rules

    model, clip, _ = sdxl
    net = LoRANetwork(clip.cond_stage_model, te_rules(["clip_l", "clip_g"], 4, 4.0), te_namer(family.TE_PREFIXES))
    sd = net.kohya_state_dict()
    names = {k.split(".")[0] for k in sd}
    assert len(names) == 6 * (12 + 32)  # q, k, v, out_proj, fc1, fc2 of every CLIP-L and CLIP-G layer
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_31_mlp_fc2"} <= names
    assert comfy_model(comfy).unmapped_lora_keys(model, sd, clip) == []


def test_size_conditioning_reaches_the_unet(comfy, sdxl):
    """y = pooled CLIP-G + Fourier features of (original size, crop, target): different geometry, different y."""
    model, clip, cached = sdxl
    cond = comfy.pack_module("nodes.comfy.text").SDXLTextConditioning(clip, model)
    samples = cached.cache.samples
    a = cond([samples[0].caption], geometries=[samples[0].geometry])
    assert a["context"].shape == (1, 77, 2048) and a["y"].shape == (1, 2816)
    other = next(s for s in samples if s.geometry.original_size != samples[0].geometry.original_size)
    b = cond([samples[0].caption], geometries=[other.geometry])
    assert torch.equal(a["y"][:, :1280], b["y"][:, :1280]) and not torch.equal(a["y"][:, 1280:], b["y"][:, 1280:])
    # kohya's max_token_length on both CLIPs: 2 windows -> 152 states of L+G; pooled CLIP-G from the first window
    long = comfy.pack_module("nodes.comfy.text").SDXLTextConditioning(clip, model, 150)
    c = long([samples[0].caption], geometries=[samples[0].geometry])
    assert c["context"].shape == (1, 152, 2048) and torch.allclose(c["y"], a["y"], atol=1e-5)
    assert torch.allclose(c["context"][:, :76], a["context"][:, :76], atol=1e-5)


def test_sdxl_text_encoder_loras_train_through_both_encoders(comfy, sdxl_checkpoint, dataset_dir):
    """One step with both text encoders trained (batch 1: back-propagating through the full-size CLIP-G costs
    ~9 s a step on 2 cores): every group gets gradients and the input CLIP is left as it was."""
    model, clip, cached = load_and_cache(comfy, sdxl_checkpoint, dataset_dir, batch_size=1)
    before = {n: (p, p.data_ptr()) for n, p in clip.cond_stage_model.named_parameters()}
    out = comfy.run_node("KilnTrainSDXL", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                         **(TRAIN | dict(steps=1, sample_every=0, sample_steps=1, sample_prompts="a")),
                         text_encoder_lr1=1e-3, text_encoder_lr2=1e-3)
    sd = out[1].state_dict
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = [k for k in sd if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and any(sd[k].abs().sum() > 0 for k in ups), prefix
    # CLIP-L: 11 of its 12 layers (SDXL reads its penultimate layer and not its pooled output: the last layer could
    # never change anything); CLIP-G: all 32 (its pooled output, from the last layer, feeds SDXL's y)
    assert "(unet 134, clip_l 66, clip_g 192)" in " ".join(map(str, out.ui["text"]))
    assert comfy_model(comfy).unmapped_lora_keys(model, sd, clip) == []
    now = dict(clip.cond_stage_model.named_parameters())
    assert all(now[n] is p and p.data_ptr() == ptr for n, (p, ptr) in before.items())
