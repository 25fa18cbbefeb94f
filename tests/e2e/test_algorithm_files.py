"""LoHa, LoKr and DoRA through a real ComfyUI server: the SD1 example trains each algorithm (UNet linears and
convs, text encoder), and ComfyUI's stock LoraLoader applies every key of the file and changes the image."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from safetensors import safe_open

from fixtures.datasets import make_dataset
from test_sd1_workflow import API, sample_workflow, saved_image

pytestmark = pytest.mark.e2e
pytest.importorskip("lycoris.functional")

ALGOS = {"loha": {}, "lokr": {"factor": 4}, "dora": {}}


@pytest.fixture(scope="module")
def base_image(comfy_server, server_sd1_checkpoint):
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    entry = comfy_server.wait(comfy_server.post_prompt(sample_workflow(server_sd1_checkpoint, None, "algobase")), 300)
    return saved_image(comfy_server, entry)


@pytest.mark.parametrize("algorithm", list(ALGOS))
def test_stock_lora_loader_applies_every_key_of_each_algorithm(comfy_server, server_sd1_checkpoint, base_image,
                                                               algorithm):
    wf = copy.deepcopy(API)
    wf["5"]["inputs"].update(conv_rank=2, algorithm=algorithm, **ALGOS[algorithm])
    wf["6"]["inputs"].update(steps=3, learning_rate=1e-2, sample_every=0, sample_steps=1, text_encoder_lr=1e-3)
    wf["7"]["inputs"]["filename"] = f"kiln/sd1_{algorithm}"
    comfy_server.wait(comfy_server.post_prompt(wf), timeout=900)
    path = comfy_server.loras_dir / "kiln" / f"sd1_{algorithm}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert any(k.startswith("lora_te_") for k in keys) and any("resnets_0_conv1" in k for k in keys)
    log_before = len(comfy_server.log_text())
    entry = comfy_server.wait(comfy_server.post_prompt(
        sample_workflow(server_sd1_checkpoint, f"kiln/sd1_{algorithm}.safetensors", f"algo{algorithm}")), 300)
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log and "ERROR" not in log, log[-3000:]
    diff = np.abs(base_image - saved_image(comfy_server, entry))
    assert diff.mean() > 0.5, f"{algorithm} made no visible difference (mean abs diff {diff.mean():.3f})"
