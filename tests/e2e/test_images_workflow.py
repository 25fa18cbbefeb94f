"""The Dataset from Images example through a real ComfyUI server: ComfyUI's own Load Image-Text (from Folder)
gives an IMAGE list and a STRING list, stock mask nodes (Convert Image to Mask, ThresholdMask) a MASK list;
Kiln trains a masked LoRA from them, shows the dataset preview, and a second Queue that re-runs the dataset
node with the same images encodes nothing."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from fixtures.datasets import make_dataset

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
API = json.loads((REPO / "example_workflows" / "api" / "sd1_images_lora.json").read_text())


def text_of(entry, node: str) -> str:
    return "\n".join(entry["outputs"][node]["text"])


def test_images_example_trains_a_masked_lora_and_a_re_run_encodes_nothing(comfy_server, server_sd1_checkpoint):
    assert server_sd1_checkpoint == API["1"]["inputs"]["ckpt_name"]
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    entry = comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(API)), timeout=900)
    # the stock folder loader's 8 images and captions reached Kiln, with the masks of the stock mask nodes
    summary = text_of(entry, "5")
    assert "8 images × 5 repeats" in summary and "masks: from the masks input" in summary, summary
    assert "8 latents: 8 encoded" in text_of(entry, "7")
    # the preview: on the node and through its IMAGE output into Preview Image (the same grid)
    shown = entry["outputs"]["5"]["images"][0]
    previewed = entry["outputs"]["6"]["images"][0]
    grids = [np.asarray(Image.open(comfy_server.base_dir / img["type"] / img.get("subfolder", "") / img["filename"]))
             for img in (shown, previewed)]
    assert grids[0].shape == grids[1].shape and grids[0].shape[1] == 4 * (192 + 6) + 6
    assert np.abs(grids[0].astype(int) - grids[1]).max() <= 1
    path = comfy_server.loras_dir / (API["10"]["inputs"]["filename"] + ".safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_masked_loss"] == "True" and meta["ss_num_train_images"] == "8"
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])

    # Queue again with the dataset node changed (it runs again on new tensors of the same images): the latent
    # cache keys on pixel and mask content, so Cache Latents encodes nothing
    again = copy.deepcopy(API)
    again["5"]["inputs"]["preview_images"] = 4
    again["9"]["inputs"]["steps"] = 2
    entry = comfy_server.wait(comfy_server.post_prompt(again), timeout=900)
    assert "8 latents: 0 encoded, 8 reused from memory" in text_of(entry, "7"), text_of(entry, "7")
