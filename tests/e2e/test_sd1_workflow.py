"""The example workflow through a real ComfyUI server: train, save, then load with stock LoraLoader."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from fixtures.datasets import make_dataset

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from workflows import api_to_ui, build  # noqa: E402

pytestmark = pytest.mark.e2e
API = json.loads((REPO / "example_workflows" / "api" / "sd1_lora.json").read_text())


def sample_workflow(ckpt: str, lora: str | None, prefix: str, latent: str = "EmptyLatentImage") -> dict:
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a kiln toy"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 3, "steps": 6, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if lora:
        wf["2"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    else:
        wf["3"]["inputs"]["clip"] = wf["4"]["inputs"]["clip"] = ["1", 1]
        wf["6"]["inputs"]["model"] = ["1", 0]
    return wf


def saved_image(server, entry) -> np.ndarray:
    img = next(o["images"][0] for o in entry["outputs"].values() if "images" in o and o["images"][0]["type"] == "output")
    return np.asarray(Image.open(server.output_dir / img.get("subfolder", "") / img["filename"]), dtype=np.int16)


@pytest.fixture(scope="module")
def trained(comfy_server, server_sd1_checkpoint):
    assert server_sd1_checkpoint == API["1"]["inputs"]["ckpt_name"]
    make_dataset(comfy_server.input_dir / "kiln_demo")
    log_before = len(comfy_server.log_text())
    entry = comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(API)), timeout=900)
    return entry, comfy_server.log_text()[log_before:]


def test_training_workflow_writes_a_kohya_lora(comfy_server, trained):
    entry, log = trained
    path = comfy_server.loras_dir / "kiln" / "sd1_demo.safetensors"
    assert path.is_file(), log[-3000:]
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert all(f.get_tensor(k).dtype.is_floating_point for k in keys)
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert modules and all(m.startswith("lora_unet_") for m in modules)
    assert set(keys) == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_output_name"] == "sd1_demo" and len(meta["sshs_model_hash"]) == 64
    # the trained LoRA lowers the training loss on a fixed batch (same samples, noise, timesteps)
    assert float(meta["kiln_probe_loss_end"]) < 0.9 * float(meta["kiln_probe_loss_start"])
    # the samples and loss plot reached the graph
    previews = [o for nid, o in entry["outputs"].items() if nid in ("8", "9")]
    assert len(previews) == 2 and all(o["images"] for o in previews)


def test_stock_lora_loader_applies_every_key_and_changes_the_output(comfy_server, server_sd1_checkpoint, trained):
    ckpt = server_sd1_checkpoint
    base = comfy_server.wait(comfy_server.post_prompt(sample_workflow(ckpt, None, "base")), timeout=300)
    log_before = len(comfy_server.log_text())
    with_lora = comfy_server.wait(comfy_server.post_prompt(
        sample_workflow(ckpt, "kiln/sd1_demo.safetensors", "lora")), timeout=300)
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    diff = np.abs(saved_image(comfy_server, base) - saved_image(comfy_server, with_lora))
    assert diff.mean() > 0.5, f"LoRA made no visible difference (mean abs diff {diff.mean():.3f})"


def kiln_part(ui: dict) -> dict:
    """What Kiln owns in a UI workflow: its nodes (inputs, outputs, widget values) and every link that touches
    one. Stock nodes change between ComfyUI versions (0.33's Save/Preview Image gained an IMAGE output), so the
    rest may differ by version."""
    kiln = {n["id"] for n in ui["nodes"] if n["type"].startswith("Kiln")}
    nodes = {n["id"]: {k: n[k] for k in ("type", "inputs", "outputs", "widgets_values", "title")}
             for n in ui["nodes"] if n["id"] in kiln}
    links = sorted(tuple(link) for link in ui["links"] if link[1] in kiln or link[3] in kiln)
    return {"nodes": nodes, "links": links}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "example_workflows" / "api").glob("*.json")))
def test_ui_workflow_is_the_api_workflow_for_this_server(comfy_server, name):
    object_info = comfy_server.get("/object_info")
    api = json.loads((REPO / "example_workflows" / "api" / name).read_text())
    committed = json.loads((REPO / "example_workflows" / name).read_text())
    assert kiln_part(committed) == kiln_part(api_to_ui(api, object_info)), \
        "regenerate with: python scripts/workflows.py --server URL"
    made = build(api, object_info, None, Path(name).stem)  # the layout, groups and Note as well
    assert [n["type"] for n in committed["nodes"]] == [n["type"] for n in made["nodes"]]
    assert [g["title"] for g in committed["groups"]] == [g["title"] for g in made["groups"]]
    note = next(n for n in committed["nodes"] if n["type"] == "Note")
    assert note["widgets_values"] == next(n for n in made["nodes"] if n["type"] == "Note")["widgets_values"]


@pytest.mark.parametrize("name, check", [
    ("sd1_masked_lora", lambda meta: meta["ss_masked_loss"] == "True"),
    ("sd1_dreambooth_reg", lambda meta: int(meta["ss_num_reg_images"]) > 0 and meta["ss_prior_loss_weight"] == "1.0"),
    # Make Regularization Images feeds Load Dataset's regularization_folder in the same graph
    ("sd1_reg_images", lambda meta: meta["ss_num_reg_images"] == "4" and meta["ss_prior_loss_weight"] == "1.0"),
    # the run Compare LoRAs draws: an intermediate save at step 20 and a validation loss
    ("sd1_compare_loras", lambda meta: meta["ss_steps"] == "40" and "kiln_validation_loss" in meta),
])
def test_masked_and_dreambooth_examples_train(comfy_server, trained, name, check):
    wf = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    if not (comfy_server.input_dir / "kiln_reg" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_reg", seed=1)
    comfy_server.wait(comfy_server.post_prompt(wf), timeout=900)
    path = comfy_server.loras_dir / (wf["7"]["inputs"]["filename"] + ".safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert check(meta), {k: v for k, v in meta.items() if k.startswith(("ss_masked", "ss_num_reg", "ss_prior"))}
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
