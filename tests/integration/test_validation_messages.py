"""A validation failure is reported once, on the input it concerns: ComfyUI attributes what a node's
validate_inputs returns to every input it takes, so Kiln's take one each. Through ComfyUI's own validate_prompt on
the example workflow."""
from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest

WORKFLOW = json.loads((Path(__file__).resolve().parents[2] / "example_workflows" / "api" / "sd1_lora.json").read_text())


def node_errors(comfy, sd1_checkpoint, **changes) -> dict:
    prompt = copy.deepcopy(WORKFLOW)
    prompt["1"]["inputs"]["ckpt_name"] = sd1_checkpoint
    for node, inputs in changes.items():
        prompt[node]["inputs"].update(inputs)
    valid, error, outputs, errors = asyncio.run(comfy.execution.validate_prompt("kiln-test", prompt, None))
    return errors


@pytest.mark.parametrize("node, inputs, concerned", [
    ("7", {"filename": "../../escape"}, "filename"),                               # Save LoRA
    ("6", {"save_name": "../../escape", "save_every_n_steps": 5}, "save_name"),    # Train
])
def test_a_failure_is_reported_once_on_its_input(comfy, sd1_checkpoint, node, inputs, concerned):
    errors = node_errors(comfy, sd1_checkpoint, **{node: inputs})
    mine = [e for e in errors[node]["errors"] if e["type"] == "custom_validation_failed"]
    assert [e["extra_info"]["input_name"] for e in mine] == [concerned], errors[node]
    assert "outside models/loras" in mine[0]["details"]


def test_the_example_validates_and_the_train_node_refuses_an_unsaveable_save_lora_before_training(comfy,
                                                                                                sd1_checkpoint):
    """What Save LoRA's validate_inputs no longer takes (overwrite, precision) is the Train node's to refuse
    before step 1, naming the Save LoRA node."""
    assert not node_errors(comfy, sd1_checkpoint)
    check_save_nodes = comfy.pack_module("nodes.training_run").check_save_nodes
    (comfy.loras_dir / "kiln").mkdir(exist_ok=True)
    (comfy.loras_dir / "kiln" / "kept.safetensors").write_bytes(b"x")
    for inputs, words in (({"precision": "fp8"}, "precision 'fp8'"),
                          ({"filename": "kiln/kept", "overwrite": False}, "overwrite is off")):
        prompt = copy.deepcopy(WORKFLOW)
        prompt["7"]["inputs"].update(inputs)
        with pytest.raises(Exception) as e:
            check_save_nodes(prompt, "6", "Train LoRA (SD1)")
        assert "Save LoRA node (7)" in str(e.value) and words in str(e.value), str(e.value)
