"""Reliability through a real ComfyUI server (issue 17): edited data trains on the next Queue, bad save names are
refused when the prompt is queued, and a LoRA whose save failed is saved on re-queue without retraining."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from safetensors import safe_open

from fixtures.datasets import make_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
API = json.loads((REPO / "example_workflows" / "api" / "sd1_lora.json").read_text())


def workflow(folder: str, filename: str) -> dict:
    wf = copy.deepcopy(API)
    wf["2"]["inputs"]["folder"] = folder
    wf["4"]["inputs"]["disk_cache"] = False
    wf["6"]["inputs"].update(steps=2, sample_every=0, sample_steps=1)
    wf["7"]["inputs"]["filename"] = filename
    return wf


def tags_of(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        freq = json.loads(f.metadata()["ss_tag_frequency"])
    return {t for folder in freq.values() for t in folder}


def executed(entry: dict) -> set[str]:
    """Node ids that ran (not served from ComfyUI's cache) in a finished prompt."""
    cached = {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}
    return set(entry["prompt"][2]) - cached


def test_an_edited_caption_and_image_train_on_the_next_queue(comfy_server, server_sd1_checkpoint):
    data = make_dataset(comfy_server.input_dir / "kiln_edit")
    wf = workflow("kiln_edit/train", "kiln/edit_test")
    lora = comfy_server.loras_dir / "kiln" / "edit_test.safetensors"
    comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(wf)), timeout=900)
    assert "zebra stripes" not in tags_of(lora)

    first = data["images"][0]
    first.with_suffix(".txt").write_text("kiln toy, zebra stripes\n", encoding="utf-8")
    replaced = data["images"][1]
    with Image.open(replaced) as im:
        ImageOps.invert(im.convert("RGB")).save(replaced.with_name("tmp.png"))
    os.replace(replaced.with_name("tmp.png"), replaced.with_suffix(".png.new"))
    os.replace(replaced.with_suffix(".png.new"), replaced)  # same name, new picture (a jpg stays a jpg name)

    entry = comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(wf)), timeout=900)
    assert {"2", "4", "6", "7"} <= executed(entry)
    assert "zebra stripes" in tags_of(lora)
    summary = "".join(entry["outputs"]["4"]["text"])
    assert "1 encoded" in summary and f"{len(data['images']) - 1} reused from memory" in summary, summary

    entry = comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(wf)), timeout=900)  # nothing changed
    assert not executed(entry) & {"2", "4", "6"}


@pytest.mark.parametrize("value, words", [("../../escape", ["outside models/loras"]),
                                          ("kiln/a\u0007b", ["control character"])])
def test_a_bad_save_lora_filename_is_reported_at_queue_time_and_stops_training(comfy_server, server_sd1_checkpoint,
                                                                              value, words):
    """ComfyUI still runs the other outputs (the previews) of a prompt with one invalid output: the Train node
    itself refuses before step 1, naming the Save LoRA node."""
    make_dataset(comfy_server.input_dir / "kiln_edit")
    wf = workflow("kiln_edit/train", value)
    wf["6"]["inputs"]["steps"] = 500
    answer = comfy_server.post("/prompt", {"prompt": wf})
    assert all(w in json.dumps(answer["node_errors"]["7"]) for w in words), answer
    with pytest.raises(comfy_server.Error) as e:
        comfy_server.wait(answer["prompt_id"], timeout=300)
    assert "Save LoRA node (7)" in str(e.value) and all(w in str(e.value) for w in words)
    assert "KilnTrainSD1 (node 6)" in str(e.value)


def test_a_bad_save_name_is_refused_when_the_prompt_is_queued(comfy_server, server_sd1_checkpoint):
    make_dataset(comfy_server.input_dir / "kiln_edit")
    wf = workflow("kiln_edit/train", "kiln/never")
    wf["6"]["inputs"].update(save_every_n_steps=1, save_name="../../escape")
    with pytest.raises(comfy_server.Error) as e:
        comfy_server.post_prompt(wf)
    assert "save_name" in str(e.value) and "outside models/loras" in str(e.value)


@pytest.fixture
def full_folder(comfy_server):
    """models/loras/full: a 4 KiB filesystem (root only: mount), where validation passes and the write fails."""
    path = comfy_server.loras_dir / "full"
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a size-limited filesystem here (not root)")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_save_lora_folder_without_room_is_refused_before_step_one(comfy_server, server_sd1_checkpoint,
                                                                   full_folder):
    make_dataset(comfy_server.input_dir / "kiln_full")
    wf = workflow("kiln_full/train", "full/lora")
    wf["6"]["inputs"]["steps"] = 500
    with pytest.raises(comfy_server.Error) as e:
        comfy_server.wait(comfy_server.post_prompt(wf), timeout=300)
    msg = str(e.value)
    assert "Save LoRA node's filename" in msg and str(full_folder) in msg and "free" in msg, msg


def test_a_failed_save_keeps_the_trained_lora_for_a_requeue(comfy_server, server_sd1_checkpoint, full_folder):
    """A filename computed in the graph (here a String node) is only known when Save LoRA runs: the write fails
    then, naming the target, and re-queueing with another name saves the cached LoRA without training again."""
    make_dataset(comfy_server.input_dir / "kiln_full")
    wf = workflow("kiln_full/train", "unused")
    wf["10"] = {"class_type": "PrimitiveString", "inputs": {"value": "full/lora"}}
    wf["7"]["inputs"]["filename"] = ["10", 0]
    with pytest.raises(comfy_server.Error) as e:
        comfy_server.wait(comfy_server.post_prompt(copy.deepcopy(wf)), timeout=900)
    msg = str(e.value)
    assert str(full_folder / "lora.safetensors") in msg and "No space left" in msg and "free" in msg, msg
    assert os.listdir(full_folder) == []
    wf["10"]["inputs"]["value"] = "kiln/rescued"
    entry = comfy_server.wait(comfy_server.post_prompt(wf), timeout=900)
    assert "7" in executed(entry) and not executed(entry) & {"2", "4", "6"}  # saved, not trained again
    assert (comfy_server.loras_dir / "kiln" / "rescued.safetensors").is_file()
