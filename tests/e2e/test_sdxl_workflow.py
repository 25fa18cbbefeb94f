"""The SDXL example workflow through a real ComfyUI server on the SDXL-family checkpoint (KOALA_700M-shaped
UNet, full-size CLIP-L/G): train, save, load with stock LoraLoader."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from safetensors import safe_open

from fixtures.datasets import make_dataset
from test_sd1_workflow import REPO, sample_workflow, saved_image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
API = json.loads((REPO / "example_workflows" / "api" / "sdxl_lora.json").read_text())


@pytest.fixture(scope="module")
def trained(comfy_server, server_sdxl_checkpoint):
    assert server_sdxl_checkpoint == API["1"]["inputs"]["ckpt_name"]
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    log_before = len(comfy_server.log_text())
    entry = comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(API)), timeout=900)
    return entry, comfy_server.log_text()[log_before:]


def test_sdxl_workflow_writes_a_kohya_sdxl_lora(comfy_server, trained):
    entry, log = trained
    path = comfy_server.loras_dir / "kiln" / "sdxl_demo.safetensors"
    assert path.is_file(), log[-3000:]
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in modules
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert float(meta["kiln_probe_loss_end"]) < 0.9 * float(meta["kiln_probe_loss_start"])
    previews = [o for nid, o in entry["outputs"].items() if nid in ("8", "9")]
    assert len(previews) == 2 and all(o["images"] for o in previews)


def test_stock_lora_loader_applies_every_sdxl_key(comfy_server, server_sdxl_checkpoint, trained):
    ckpt = server_sdxl_checkpoint
    base = comfy_server.wait(comfy_server.post_prompt(sample_workflow(ckpt, None, "sdxlbase")), 300)
    log_before = len(comfy_server.log_text())
    with_lora = comfy_server.wait(comfy_server.post_prompt(sample_workflow(ckpt, "kiln/sdxl_demo.safetensors",
                                                                           "sdxllora")), 300)
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    diff = np.abs(saved_image(comfy_server, base) - saved_image(comfy_server, with_lora))
    assert diff.mean() > 0.5, f"LoRA made no visible difference (mean abs diff {diff.mean():.3f})"
