"""example_workflows/flux_lora.json through a real ComfyUI server: it trains, writes a LoRA with kohya's Flux names
and metadata, and stock Load LoRA applies every key and changes the sample.

The example names the real FLUX.1 dev files and sizes (what a user runs); this test swaps in the tiny fixtures
(tests/fixtures/tiny_models.py) and test sizes, and nothing else: the tiny FLUX.1 dev model for flux1-dev, the SD1
fixture's CLIP-L in place of DualCLIPLoader's CLIP-L + T5-XXL (ComfyUI builds T5-XXL only at its full 4.7B size;
the tiny Flux takes CLIP-L's 768-wide states as its context) and the SD3 fixture's 16-channel VAE in place of ae.
Every Flux setting of the example (shift, discrete_flow_shift 3.1582, raw, guidance 1.0, gradient checkpointing)
trains as it is."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fixtures.datasets import make_dataset
from test_sd1_workflow import REPO, sample_workflow, saved_image

pytestmark = pytest.mark.e2e

API = json.loads((REPO / "example_workflows" / "api" / "flux_lora.json").read_text())
# the example's real sizes -> test sizes (node id -> inputs); the model files are swapped in by tiny_example()
TEST_SIZES = {
    "2": dict(folder="kiln_demo/train", resolution=64, batch_size=2, min_bucket_reso=32, max_bucket_reso=128,
              bucket_reso_steps=32),
    "5": dict(rank=4, alpha=4.0),
    "6": dict(steps=8, learning_rate=1e-2, sample_prompts="a kiln toy", sample_every=4, sample_steps=2),
}
MODEL, CLIP, VAE, TRAIN, SAVE = "1", "3", "10", "6", "7"


def tiny_example(unet: str, sd1: str, sd3: str) -> dict:
    """flux_lora.json with the tiny fixtures in place of the real files, at test sizes."""
    api = copy.deepcopy(API)
    assert (api[MODEL]["class_type"], api[CLIP]["class_type"], api[VAE]["class_type"]) == \
        ("UNETLoader", "DualCLIPLoader", "VAELoader")
    assert api[CLIP]["inputs"]["type"] == "flux" and api[TRAIN]["inputs"]["clip"] == [CLIP, 0]
    api[MODEL]["inputs"]["unet_name"] = unet
    api[CLIP] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd1}}
    api[TRAIN]["inputs"]["clip"] = [CLIP, 1]
    api[VAE] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd3}}
    api["4"]["inputs"]["vae"] = [VAE, 2]
    for nid, inputs in TEST_SIZES.items():
        assert set(inputs) <= set(api[nid]["inputs"]), nid
        api[nid]["inputs"].update(inputs)
    return api


@pytest.fixture(scope="module")
def flux_files(comfy_server, tiny_flux_paths, server_sd1_checkpoint, server_sd3_checkpoint):
    """(diffusion model, SD1 checkpoint, SD3 checkpoint) names in comfy_server's models folders."""
    return (comfy_server.install(tiny_flux_paths("flux-dev"), "diffusion_models"), server_sd1_checkpoint,
            server_sd3_checkpoint)


@pytest.fixture(scope="module")
def trained(comfy_server, flux_files):
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    log_before = len(comfy_server.log_text())
    entry = comfy_server.wait(comfy_server.post_prompt(tiny_example(*flux_files)), timeout=900)
    return entry, comfy_server.log_text()[log_before:]


def test_the_example_is_kohyas_recommended_flux_dev_run():
    """What a FLUX.1 dev user opens: the real files and kohya's recommended settings (docs/flux_train_network.md)."""
    assert API[MODEL]["inputs"]["unet_name"] == "flux1-dev.safetensors"
    assert (API[CLIP]["inputs"]["clip_name1"], API[CLIP]["inputs"]["clip_name2"]) == \
        ("clip_l.safetensors", "t5xxl_fp16.safetensors")
    assert API[VAE]["inputs"]["vae_name"] == "ae.safetensors"
    train = API[TRAIN]["inputs"]
    assert (train["timestep_sampling"], train["discrete_flow_shift"], train["model_prediction_type"],
            train["guidance_scale"]) == ("shift", 3.1582, "raw", 1.0)
    assert API["2"]["inputs"]["resolution"] == 1024 and train["gradient_checkpointing"]


def test_flux_example_writes_a_kohya_flux_lora(comfy_server, trained):
    entry, log = trained
    path = comfy_server.loras_dir / (API[SAVE]["inputs"]["filename"] + ".safetensors")
    assert path.is_file(), log[-3000:]
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert all(torch.isfinite(f.get_tensor(k).float()).all() for k in keys)
    modules = {k.rsplit(".", 1)[0] if k.endswith(".alpha") else k.rsplit(".", 2)[0] for k in keys}
    assert all(m.startswith("lora_unet_") for m in modules)  # text_encoder_lr1 0: CLIP-L does not train
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_2",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_modulation_lin"} <= modules
    for m in modules:
        assert {k[len(m) + 1:] for k in keys if k.startswith(m + ".")} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert (meta["ss_network_module"], meta["ss_base_model_version"], meta["ss_model_type"]) == \
        ("networks.lora_flux", "flux1", "flux")
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == \
        ("flux-1-dev/lora", "https://github.com/black-forest-labs/flux")
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"], meta["ss_model_prediction_type"],
            meta["ss_guidance_scale"], meta["ss_network_dim"], meta["ss_network_alpha"]) == \
        ("shift", "3.1582", "raw", "1.0", "4", "4.0")
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
    previews = [o for nid, o in entry["outputs"].items() if nid in ("8", "9")]
    assert len(previews) == 2 and all(o["images"] for o in previews)


def test_stock_load_lora_applies_every_flux_key_and_changes_the_sample(comfy_server, trained, flux_files):
    unet, sd1, sd3 = flux_files

    def workflow(lora: str | None, prefix: str) -> dict:
        """sample_workflow on the tiny Flux: its MODEL from Load Diffusion Model, CLIP from the SD1 fixture, VAE
        from the SD3 fixture, as the training run had them."""
        wf = sample_workflow(sd1, lora, prefix, "EmptySD3LatentImage")
        wf["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
        wf["11"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd3}}
        for node in wf.values():
            for name, value in node["inputs"].items():
                if value == ["1", 0]:
                    node["inputs"][name] = ["10", 0]
                elif value == ["1", 2]:
                    node["inputs"][name] = ["11", 2]
        wf["6"]["inputs"].update(cfg=1.0, steps=4)
        return wf
    base = comfy_server.wait(comfy_server.post_prompt(workflow(None, "fluxbase")), 600)
    log_before = len(comfy_server.log_text())
    with_lora = comfy_server.wait(comfy_server.post_prompt(
        workflow(API[SAVE]["inputs"]["filename"] + ".safetensors", "fluxlora")), 600)
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    diff = np.abs(saved_image(comfy_server, base) - saved_image(comfy_server, with_lora))
    assert diff.mean() > 0.5, f"LoRA made no visible difference (mean abs diff {diff.mean():.3f})"
