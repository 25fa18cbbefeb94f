"""The SDXL and SD3 example workflows through a real ComfyUI server: train, save a kohya LoRA of the right
family, and load it with stock LoraLoader with every key applied. sd3_lora_separate_te loads the model and the
text encoders from separate files (Load Checkpoint without text encoders + DualCLIPLoader), as kohya's SD3 guide
does with --clip_l/--clip_g."""
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

FAMILIES = {
    # name: (checkpoint fixture, sampler latent node, modelspec.architecture, ss_base_model_version, a module it must have)
    "sdxl": ("server_sdxl_checkpoint", "EmptyLatentImage", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0",
             "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"),
    "sd3": ("server_sd3_checkpoint", "EmptySD3LatentImage", "stable-diffusion-3-medium/lora", "medium",
            "lora_unet_joint_blocks_0_x_block_mlp_fc1"),  # x_mlp_dim from the workflow's network_args
}
FAMILIES["sdxl_lokr"] = FAMILIES["sdxl"]  # sdxl_lokr.json: the SDXL example with algorithm lokr
FAMILIES["sd3_separate_te"] = ("server_sd3_split",) + FAMILIES["sd3"][1:]
WORKFLOW = {"sdxl": "sdxl_lora", "sd3": "sd3_lora", "sdxl_lokr": "sdxl_lokr", "sd3_separate_te": "sd3_lora_separate_te"}
OUTPUT = {"sdxl": "sdxl_demo", "sd3": "sd3_demo", "sdxl_lokr": "sdxl_lokr", "sd3_separate_te": "sd3_separate_te_demo"}
# the node that loads the text encoders, where the workflow does not take its CLIP from the checkpoint
CLIP_LOADER = {"sd3_separate_te": "3"}
# keys each module of the file must have (LoKr's w2 is full on small layers, factorised on the rest)
MODULE_KEYS = {"sdxl": ({"lora_down.weight", "lora_up.weight", "alpha"},) * 2,
               "sd3": ({"lora_down.weight", "lora_up.weight", "alpha"},) * 2,
               "sdxl_lokr": ({"lokr_w1", "alpha"}, {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"})}
MODULE_KEYS["sd3_separate_te"] = MODULE_KEYS["sd3"]


@pytest.fixture(scope="module", params=[pytest.param("sd3"), pytest.param("sdxl", marks=pytest.mark.slow),
                                        pytest.param("sdxl_lokr", marks=pytest.mark.slow),
                                        pytest.param("sd3_separate_te", marks=pytest.mark.slow)],
                ids=["sd3", "sdxl", "sdxl_lokr", "sd3_separate_te"])
def trained(request, comfy_server):
    family = request.param
    ckpt = request.getfixturevalue(FAMILIES[family][0])
    api = json.loads((REPO / "example_workflows" / "api" / f"{WORKFLOW[family]}.json").read_text())
    assert ckpt == api["1"]["inputs"]["ckpt_name"]
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    log_before = len(comfy_server.log_text())
    entry = comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(api)), timeout=900)
    return family, ckpt, entry, comfy_server.log_text()[log_before:]


def test_example_workflow_writes_a_kohya_lora_of_its_family(comfy_server, trained):
    family, _, entry, log = trained
    _, _, arch, version, module = FAMILIES[family]
    path = comfy_server.loras_dir / "kiln" / f"{OUTPUT[family]}.safetensors"
    assert path.is_file(), log[-3000:]
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in keys)
    modules = {k.rsplit(".alpha", 1)[0] for k in keys if k.endswith(".alpha")}
    assert module in modules and all(m.startswith("lora_unet_") for m in modules)
    least, most = MODULE_KEYS[family]
    for m in modules:
        assert least <= {k[len(m) + 1:] for k in keys if k.startswith(m + ".")} <= most, m
    if family == "sdxl_lokr":
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "4"}
    assert meta["modelspec.architecture"] == arch and meta["ss_base_model_version"] == version
    assert float(meta["kiln_probe_loss_end"]) < 0.9 * float(meta["kiln_probe_loss_start"])
    previews = [o for nid, o in entry["outputs"].items() if nid in ("8", "9")]
    assert len(previews) == 2 and all(o["images"] for o in previews)


def test_stock_lora_loader_applies_every_key(comfy_server, trained):
    family, ckpt, _, _ = trained
    latent = FAMILIES[family][1]

    def workflow(lora: str | None, prefix: str) -> dict:
        wf = sample_workflow(ckpt, lora, prefix, latent)
        if family in CLIP_LOADER:  # the same text-encoder loader as the training workflow, for sampling too
            api = json.loads((REPO / "example_workflows" / "api" / f"{WORKFLOW[family]}.json").read_text())
            wf["20"] = {"class_type": api[CLIP_LOADER[family]]["class_type"],
                        "inputs": api[CLIP_LOADER[family]]["inputs"]}
            for node in wf.values():
                if node["inputs"].get("clip") == ["1", 1]:
                    node["inputs"]["clip"] = ["20", 0]
        return wf
    base = comfy_server.wait(comfy_server.post_prompt(workflow(None, f"{family}base")), 300)
    log_before = len(comfy_server.log_text())
    with_lora = comfy_server.wait(comfy_server.post_prompt(
        workflow(f"kiln/{OUTPUT[family]}.safetensors", f"{family}lora")), 300)
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    diff = np.abs(saved_image(comfy_server, base) - saved_image(comfy_server, with_lora))
    assert diff.mean() > 0.5, f"LoRA made no visible difference (mean abs diff {diff.mean():.3f})"
