"""Export Run: the graph around a Train node as an API workflow with resolved paths, plus the torchrun line that
trains it on several GPUs or machines (cli.py). The server itself never starts training processes: peers that did
relaunched ComfyUI once per GPU inside the server; here the user runs the line in a shell."""
from __future__ import annotations

import json
import os
import shlex
import sys

from comfy_api.latest import io, ui

import folder_paths

from ..trainer_core.training.distributed import TRAINERS
from ..trainer_core.errors import KilnError
from .dataset_nodes import resolve_cache_folder, resolve_folder

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = "Export Run (torchrun)"
# inputs holding a folder, resolved the way the node resolves them (so the file runs from any working directory)
FOLDERS = {"KilnLoadDataset": ("folder", "regularization_folder"), "KilnMaskSource": ("mask_folder",),
           "KilnCacheLatents": ("cache_folder",)}


def resolved_prompt(prompt: dict, own_id: str) -> dict:
    """The API workflow without export nodes, every folder input an absolute path."""
    out = {k: json.loads(json.dumps(v)) for k, v in prompt.items()
           if k != str(own_id) and v.get("class_type") != "KilnExportRun"}
    trainers = [k for k, v in out.items() if v.get("class_type") in TRAINERS]
    if len(trainers) != 1:
        raise KilnError(f"{NODE}: a multi-process run trains one LoRA, so the graph must hold exactly one of "
                        f"{', '.join(TRAINERS)}; it holds {len(trainers)}.")
    for node in out.values():
        for name in FOLDERS.get(node.get("class_type"), ()):
            value = node["inputs"].get(name)
            if isinstance(value, str) and value.strip():
                node["inputs"][name] = (resolve_cache_folder(value) if name == "cache_folder"
                                        else resolve_folder(value, f"{NODE}: {node['class_type']}.{name}"))
    return out


def comfy_arguments() -> list[str]:
    """The ComfyUI options that decide where models, inputs and outputs are, so the run sees the same files."""
    from comfy.cli_args import args
    out = ["--cpu"] if args.cpu else []
    for flag, value in (("--base-directory", args.base_directory), ("--input-directory", args.input_directory),
                        ("--output-directory", args.output_directory),
                        ("--user-directory", getattr(args, "user_directory", None))):
        if value:
            out += [flag, os.path.abspath(value)]
    for group in args.extra_model_paths_config or []:
        for path in (group if isinstance(group, list) else [group]):
            out += ["--extra-model-paths-config", os.path.abspath(path)]
    return out


def launch_command(workflow: str, nproc_per_node: int, nnodes: int, rdzv_endpoint: str, run_id: str) -> list[str]:
    """torchrun (as ``python -m torch.distributed.run``, the Python that runs ComfyUI) around cli.py. One machine:
    --standalone; several: the same line on every machine, meeting at rdzv_endpoint (c10d rendezvous)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint.strip():
            raise KilnError(f"{NODE}: nnodes is {nnodes}: set rdzv_endpoint to host:port of one machine every other "
                            f"machine can reach (e.g. 10.0.0.1:29500).")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint.strip()}",
                f"--rdzv_id={run_id}"]
    comfyui = os.path.dirname(os.path.abspath(folder_paths.__file__))
    return cmd + [os.path.join(PACK, "cli.py"), "--comfyui", comfyui, "--workflow", workflow, "--",
                  *comfy_arguments()]


def export_run(prompt: dict | None, own_id: str, filename_prefix: str, nproc_per_node: int, nnodes: int,
               rdzv_endpoint: str = "") -> tuple[str, str, list[str]]:
    """Write <output>/<prefix>.json and <prefix>.sh; return their paths and the command."""
    if not prompt:
        raise KilnError(f"{NODE}: no graph to export (this node exports the graph it is queued in).")
    workflow = resolved_prompt(prompt, own_id)
    out_dir = os.path.abspath(folder_paths.get_output_directory())
    base = os.path.abspath(os.path.join(out_dir, filename_prefix.strip() or "kiln/run"))
    if os.path.commonpath([base, out_dir]) != out_dir:
        raise KilnError(f"{NODE}: filename_prefix {filename_prefix!r} leaves the output folder; use a relative name "
                        f"such as kiln/run.")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    json_path, sh_path = base + ".json", base + ".sh"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(workflow, f, indent=2)
    cmd = launch_command(json_path, nproc_per_node, nnodes, rdzv_endpoint, os.path.basename(base))
    with open(sh_path, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\n# Kiln: train this workflow on " + (f"{nproc_per_node} processes" if nnodes == 1 else
                f"{nnodes} machines x {nproc_per_node} processes (run this same file on every machine)")
                + "; batch_size is per process.\n" + shlex.join(cmd) + "\n")
    os.chmod(sh_path, 0o755)
    return json_path, sh_path, cmd


class KilnExportRun(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnExportRun",
            display_name=NODE,
            category="Kiln",
            description="Writes this graph (one Train node) as an API workflow with absolute folder paths, and the "
                        "torchrun command that trains it on several GPUs or machines with cli.py. Queue only this "
                        "node (right-click → Queue Selected Output Nodes) to export without training here.",
            inputs=[
                io.String.Input("filename_prefix", default="kiln/run",
                                tooltip="Written in ComfyUI's output folder: PREFIX.json (the workflow) and PREFIX.sh "
                                        "(the command)."),
                io.Int.Input("nproc_per_node", default=2, min=1, max=64,
                             tooltip="Processes per machine: one per GPU. batch_size is per process, so the total "
                                     "batch is batch_size x nproc_per_node x nnodes (x grad_accum)."),
                io.Int.Input("nnodes", default=1, min=1, max=1024,
                             tooltip="Machines. Above 1, run the same .sh on each; they meet at rdzv_endpoint."),
                io.String.Input("rdzv_endpoint", default="", optional=True,
                                tooltip="host:port of one machine all can reach (nnodes > 1 only), e.g. 10.0.0.1:29500."),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, filename_prefix, nproc_per_node, nnodes, rdzv_endpoint="") -> io.NodeOutput:
        json_path, sh_path, cmd = export_run(cls.hidden.prompt, cls.hidden.unique_id, filename_prefix,
                                             nproc_per_node, nnodes, rdzv_endpoint)
        return io.NodeOutput(ui=ui.PreviewText(f"{json_path}\n{sh_path}\n\n{shlex.join(cmd)}"))
