"""Train LoRA (any model) in process on a family Kiln has no preset for: the tiny PixArt-Sigma model
(tests/fixtures/tiny_models.py) by Load Diffusion Model, conditioned by a stock CLIP encode (the SD3 fixture's CLIP:
CLIP-L's states padded to T5's 4096 by ComfyUI's SD3 text encoder, the width PixArt takes), latents from the SD1
fixture's 4-channel VAE. The objective is ComfyUI's (PixArt samples as eps on its sqrt_linear schedule), the
conditioning the model's own extra_conds, the LoRA keys ComfyUI's own module names."""
from __future__ import annotations

import logging

import pytest
import torch

from fixtures.kiln_nodes import diffusion_model_parts, kiln_error, lora_config, sample_once
from test_train_sd1 import TRAIN

ANY_OPTS = dict(timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=0.0, model_prediction_type="raw",
                weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
ANY_TRAIN = TRAIN | dict(steps=8, learning_rate=3e-3, sample_every=0, sample_steps=1, sample_cfg=1.0, seed=3)
# PixArt's position table divides by round(mean latent side / 64) (Python rounds 0.5 to 0): latents of 48 (384 px)
PIXART_SIZES = dict(batch_size=1, resolution=384, min_bucket_reso=384, max_bucket_reso=384, bucket_reso_steps=64)
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1",
                 "mlp.fc2")


@pytest.fixture(scope="module")
def pixart(comfy, pixart_model_name, sd1_checkpoint, sd3_checkpoint, dataset_dir):
    """(MODEL, CLIP, cached dataset): PixArt-Sigma by Load Diffusion Model, the SD3 fixture's CLIP, latents cached
    through the SD1 fixture's VAE."""
    return diffusion_model_parts(comfy, pixart_model_name, sd3_checkpoint, sd1_checkpoint, dataset_dir, **PIXART_SIZES)


def sample(comfy, model, clip):
    return sample_once(comfy, model, clip, 384, "EmptyLatentImage", "normal")


def test_fixture_is_a_family_without_a_preset(pixart):
    model = pixart[0]
    assert type(model.model.model_config).__name__ == "PixArtSigma"
    assert model.model.diffusion_model.y_embedder.y_proj.fc1.in_features == 4096


@pytest.mark.slow
def test_any_model_trains_pixart_in_place_and_stock_lora_loader_applies_every_key(comfy, pixart, caplog):
    model, clip, cached = pixart
    net = model.model.diffusion_model
    before = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in net.named_parameters()}
    base = sample(comfy, model, clip)
    with caplog.at_level(logging.INFO):
        out = comfy.run_node("KilnTrainAnyModel", model=model, clip=clip, dataset=cached,
                             lora_config=lora_config(comfy), **ANY_TRAIN, **ANY_OPTS)
    model_out, lora, samples, _plot, _clip = out
    print(out.ui["text"][0].splitlines()[0])  # the run's figures (steps, s/step, probe loss), shown with -rP
    meta = lora.metadata
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
    # the line saying no preset applied, and what was targeted, in the log and the node's text
    line = "no family preset applied (PixArtSigma, PixArtMS, eps): LoRA on 14 attention/MLP Linear layers of blocks (2)"
    assert any(line in r.getMessage() for r in caplog.records)
    assert line in out.ui["text"][0]
    # the input MODEL: same objects, same storage, same values, nothing left attached
    now = dict(net.named_parameters())
    assert all(now[n] is p and p.data_ptr() == ptr and torch.equal(p, v) for n, (p, ptr, v) in before.items())
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in net.modules())
    assert torch.equal(sample(comfy, model, clip), base)
    # ComfyUI's own module names: every attention/MLP Linear of both blocks, nothing else
    names = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in lora.state_dict}
    assert names == {f"diffusion_model.blocks.{i}.{s}" for i in range(2) for s in BLOCK_LINEARS}
    assert all(f"{n}.{k}" in lora.state_dict for n in names for k in ("lora_up.weight", "lora_down.weight", "alpha"))
    assert meta["ss_base_model_version"] == "PixArtSigma"
    # stock LoraLoaderModelOnly applies every key and changes the sample, as the Train node's MODEL output does
    comfy.run_node("KilnSaveLora", lora=lora, filename="kiln/any_model_test", precision="fp32", overwrite=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = comfy.run_node("LoraLoaderModelOnly", model=model, lora_name="kiln/any_model_test.safetensors",
                                strength_model=1.0)[0]
        after = sample(comfy, loaded, clip)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not torch.equal(after, base)
    assert torch.allclose(after, sample(comfy, model_out, clip), atol=1e-5)
    assert samples.shape == (1, 384, 384, 3)


@pytest.mark.slow
def test_any_model_refuses_ddpm_keys_on_a_flow_model_by_name(comfy, sd3_checkpoint, dataset_dir):
    from test_train_sd1 import load_and_cache
    model, clip, cached = load_and_cache(comfy, sd3_checkpoint, dataset_dir)  # SD3: flow (it has a preset too)
    with pytest.raises(Exception) as err:
        comfy.run_node("KilnTrainAnyModel", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                       **(ANY_TRAIN | dict(steps=1, training_args="noise_offset=0.1")), **ANY_OPTS)
    assert all(w in kiln_error(err) for w in ("noise_offset", "flow"))
    # without it, the flow path trains (velocity target on ComfyUI's own flow timestep), naming the preset it skipped
    out = comfy.run_node("KilnTrainAnyModel", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                         **(ANY_TRAIN | dict(steps=2)), **ANY_OPTS)
    lora = out[1]
    print(out.ui["text"][0].splitlines()[0])
    assert comfy.pack_module("nodes.comfy.model").unmapped_lora_keys(model, lora.state_dict) == []
    assert any(k.startswith("diffusion_model.joint_blocks.0.x_block.attn.qkv.") for k in lora.state_dict)
    assert not any("adaLN_modulation" in k for k in lora.state_dict)
    assert "SD3 has a preset: Train LoRA (SD3)" in out.ui["text"][0]
    assert "no family preset applied (SD3, OpenAISignatureMMDITWrapper, flow)" in out.ui["text"][0]
    assert lora.metadata["ss_timestep_sampling"] == "shift"
