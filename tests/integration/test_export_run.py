"""Export Run (torchrun) in process: the graph it sits in becomes an API workflow (itself left out, folders made
absolute) that ComfyUI's validator accepts, plus the torchrun line around cli.py (the launch that
tests/e2e/test_torchrun.py runs); several machines get the c10d rendezvous instead of --standalone."""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from fixtures.datasets import make_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def graph(comfy, sd1_checkpoint):
    import folder_paths
    make_dataset(Path(folder_paths.get_input_directory()) / "kiln_export")
    prompt = json.loads((REPO / "example_workflows" / "api" / "sd1_lora.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = sd1_checkpoint
    prompt["2"]["inputs"]["folder"] = "kiln_export/train"
    prompt["99"] = {"class_type": "KilnExportRun", "inputs": {"filename_prefix": "kiln/run", "nproc_per_node": 2,
                                                               "nnodes": 1, "rdzv_endpoint": ""}}
    return prompt


def test_export_writes_the_workflow_and_the_torchrun_line(comfy, graph):
    import folder_paths
    export = comfy.pack_module("nodes.export_nodes").export_run
    json_path, sh_path, cmd = export(graph, "99", "kiln/run", 2, 1)
    assert json_path == os.path.join(folder_paths.get_output_directory(), "kiln", "run.json")
    exported = json.loads(Path(json_path).read_text())
    assert set(exported) == set(graph) - {"99"}
    assert exported["2"]["inputs"]["folder"] == os.path.join(folder_paths.get_input_directory(), "kiln_export/train")
    assert exported["6"] == graph["6"]  # the Train node as built in the UI
    valid = asyncio.run(comfy.execution.validate_prompt("export", exported, None))
    assert valid[0], valid[1]
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    assert os.path.realpath(cmd[5]) == str(REPO / "cli.py") and cmd[cmd.index("--workflow") + 1] == json_path
    comfyui = cmd[cmd.index("--comfyui") + 1]
    assert os.path.isfile(os.path.join(comfyui, "main.py"))
    assert "--cpu" in cmd[cmd.index("--"):]  # this ComfyUI runs on the CPU: so does the exported run
    assert shlex.join(cmd) in Path(sh_path).read_text() and os.access(sh_path, os.X_OK)


def test_several_machines_meet_at_the_rendezvous(comfy, graph):
    export = comfy.pack_module("nodes.export_nodes").export_run
    _, sh_path, cmd = export(graph, "99", "kiln/multi", 8, 2, "10.0.0.1:29500")
    assert "--standalone" not in cmd
    assert {"--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29500",
            "--rdzv_id=multi"} <= set(cmd)
    assert "2 machines x 8 processes (run this same file on every machine)" in Path(sh_path).read_text()
    with pytest.raises(Exception, match="set rdzv_endpoint"):
        export(graph, "99", "kiln/multi", 8, 2, "")
    two = {**graph, "6b": graph["6"]}
    with pytest.raises(Exception, match="exactly one of KilnTrainSD1"):
        export(two, "99", "kiln/two", 2, 1)
    with pytest.raises(Exception, match="leaves the output folder"):
        export(graph, "99", "../outside", 2, 1)
