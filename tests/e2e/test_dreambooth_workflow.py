"""The DreamBooth example through a real ComfyUI server: the whole UNet trains with a regularization folder, Kiln's
Save Checkpoint writes a full checkpoint, CheckpointLoaderSimple loads it (in this server and in a fresh one) and
samples differently from the base model, and the MODEL the Train node received samples exactly as before."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from fixtures.datasets import make_dataset
from test_sd1_workflow import sample_workflow, saved_image

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
API = json.loads((REPO / "example_workflows" / "api" / "sd1_dreambooth_full.json").read_text())
SAVED = API["7"]["inputs"]["filename"] + ".safetensors"


def cached_nodes(entry: dict) -> set[str]:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


@pytest.fixture(scope="module")
def trained(comfy_server, server_sd1_checkpoint):
    assert server_sd1_checkpoint == API["1"]["inputs"]["ckpt_name"]
    for name, seed in (("kiln_demo", 0), ("kiln_reg", 1)):
        if not (comfy_server.input_dir / name / "train").is_dir():
            make_dataset(comfy_server.input_dir / name, seed=seed)
    before = comfy_server.wait(comfy_server.post_prompt(sample_workflow(server_sd1_checkpoint, None, "db_before")),
                               timeout=300)
    log_before = len(comfy_server.log_text())
    entry = comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(API)), timeout=900)
    log = comfy_server.log_text()[log_before:]
    after = comfy_server.wait(comfy_server.post_prompt(sample_workflow(server_sd1_checkpoint, None, "db_after")),
                              timeout=300)
    return dict(entry=entry, log=log, before=before, after=after)


def test_trains_with_regularization_images_and_writes_a_full_checkpoint(comfy_server, trained):
    path = comfy_server.checkpoints_dir / SAVED
    assert path.is_file(), trained["log"][-3000:]
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"model", "cond_stage_model", "first_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["ss_output_name"] == "sd1_dreambooth_full"
    assert int(meta["ss_num_reg_images"]) > 0 and meta["ss_prior_loss_weight"] == "1.0"
    assert meta["ss_fused_backward_pass"] == "True" and meta["kiln_trained"] == "unet"
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
    previews = [o for nid, o in trained["entry"]["outputs"].items() if nid in ("8", "9")]
    assert len(previews) == 2 and all(o["images"] for o in previews)


def test_the_input_model_samples_exactly_as_before(comfy_server, trained):
    # the checkpoint loader's MODEL is the one the Train node received (cached, not re-loaded); the sampler ran again
    assert "1" in cached_nodes(trained["after"]) and "6" not in cached_nodes(trained["after"])
    assert np.array_equal(saved_image(comfy_server, trained["before"]), saved_image(comfy_server, trained["after"]))


def test_the_saved_checkpoint_loads_and_samples_differently_from_the_base(comfy_server, trained):
    entry = comfy_server.wait(comfy_server.post_prompt(sample_workflow(SAVED, None, "db_loaded")), timeout=300)
    diff = np.abs(saved_image(comfy_server, entry) - saved_image(comfy_server, trained["before"]))
    assert diff.mean() > 0.5, f"the fine-tuned model samples like the base (mean abs diff {diff.mean():.3f})"
    trained["loaded"] = saved_image(comfy_server, entry)


def test_a_fresh_server_loads_the_saved_checkpoint_and_samples(comfy_server, trained, new_comfy_server, tmp_path):
    if "loaded" not in trained:
        pytest.skip("needs the sample of the saved checkpoint from the first server")
    fresh = new_comfy_server(tmp_path / "fresh")
    try:
        (fresh.checkpoints_dir / "kiln").mkdir(parents=True, exist_ok=True)
        shutil.copy(comfy_server.checkpoints_dir / SAVED, fresh.checkpoints_dir / SAVED)
        entry = fresh.wait(fresh.post_prompt(sample_workflow(SAVED, None, "db_fresh")), timeout=300)
        image = saved_image(fresh, entry)
    finally:
        fresh.stop()
    assert np.array_equal(image, trained["loaded"])  # the same weights, the same sample, in another process
