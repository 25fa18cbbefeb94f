"""The demo behind `bash scripts/demo.sh`: train a LoRA through a real, headless ComfyUI server.

Generates a tiny random-weight SD1 checkpoint and a small captioned image set (nothing is downloaded)
into that ComfyUI's models/ and input/, starts `main.py` on 127.0.0.1, posts
example_workflows/api/sd1_lora.json, prints progress and loss as the server reports them over its
websocket, and leaves the LoRA in models/loras/kiln/sd1_demo.safetensors.

It also makes what the other examples name (example_workflows/): the class images of the DreamBooth ones
(input/kiln_reg); with --examples the tiny SDXL and SD3 models as well (about 4 GB, a minute: ComfyUI builds
CLIP-G at full size), so every template runs as it opens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

from comfy_server import ComfyServer  # noqa: E402


def example_models(tiny_models) -> dict[tuple[str, str], tuple[str, object]]:
    """{(models/ folder, file name): (family, builder)} for every tiny model an example names."""
    split = {part: tiny_models.default_name(f"sd3-{part}") for part in ("model", "clip_l", "clip_g")}
    return {("checkpoints", tiny_models.default_name("sd1")): ("sd1", tiny_models.build_sd1_checkpoint),
            ("checkpoints", tiny_models.default_name("sdxl")): ("sdxl", tiny_models.build_sdxl_checkpoint),
            ("checkpoints", tiny_models.default_name("sd3")): ("sd3", tiny_models.build_sd3_checkpoint),
            **{("checkpoints" if part == "model" else "text_encoders", name): ("sd3-split", part)
               for part, name in split.items()}}


def prepare_examples(server: ComfyServer, everything: bool) -> None:
    """The regularization images the DreamBooth examples read; with ``everything`` the SDXL and SD3 models."""
    from fixtures import tiny_models
    from fixtures.datasets import make_dataset

    reg = server.input_dir / "kiln_reg"
    if not (reg / "train").is_dir():
        print(f"[demo] generating class images for the DreamBooth examples: {reg}")
        make_dataset(reg, seed=1)
    if not everything:
        return
    cache = REPO / ".kiln" / "fixtures"  # the split SD3 files, linked into models/ (as scripts/screenshot.py)
    cache.mkdir(parents=True, exist_ok=True)
    for (folder, name), (family, build) in example_models(tiny_models).items():
        dest = server.models_dir / folder / name
        if dest.exists() or family == "sd1":
            continue
        print(f"[demo] generating a tiny random-weight {family} model: {dest}")
        if family == "sd3-split":
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(tiny_models.build_sd3_split_files(str(cache))[build])
        else:
            build(str(dest))


def prepare(comfyui: Path, server: ComfyServer, workflow: dict, cpu: bool) -> None:
    from fixtures import tiny_models
    from fixtures.datasets import make_dataset

    tiny_models.ensure_comfy_importable(str(comfyui))
    import comfy.options  # noqa: F401  (keeps ComfyUI's argv parsing off in this process)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = cpu  # the model builder imports comfy.model_management, which picks a device at import
    ckpt = server.checkpoints_dir / workflow["1"]["inputs"]["ckpt_name"]
    if not ckpt.exists():
        print(f"[demo] generating a tiny random-weight SD1 checkpoint: {ckpt}")
        tiny_models.build_sd1_checkpoint(str(ckpt))
    data = server.input_dir / Path(workflow["2"]["inputs"]["folder"]).parent
    if not (data / "train").is_dir():
        print(f"[demo] generating a captioned image set: {data}")
        make_dataset(data)


async def follow(server: ComfyServer, prompt_id: str, client_id: str) -> None:
    """Print the server's progress and Kiln's loss events for this prompt until it finishes."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary frames are preview images
                event = json.loads(msg.data)
                kind, data = event.get("type"), event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "executing" and data.get("node"):
                    print(f"[demo] running node {data['node']}")
                elif kind == "kiln.loss":
                    step, total = data["step"], data["total"]
                    if step == 1 or step == total or step % max(1, total // 10) == 0:
                        print(f"[demo]   step {step}/{total}  loss {data['loss']:.4f}  lr {data['lr']:.2e}  {data['seconds']:.1f}s")
                elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                    return
                elif kind == "executing" and data.get("node") is None:
                    return


def main() -> int:
    ap = argparse.ArgumentParser(description="Train the demo LoRA through a real ComfyUI server.")
    ap.add_argument("--workflow", default=str(REPO / "example_workflows" / "api" / "sd1_lora.json"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--examples", action="store_true",
                    help="also make the tiny SDXL and SD3 models the other examples name (about 4 GB)")
    args = ap.parse_args()

    comfyui = Path(os.environ["KILN_COMFYUI"])
    python = os.environ.get("KILN_PYTHON", sys.executable)
    workflow = json.loads(Path(args.workflow).read_text())
    import torch
    cpu = not torch.cuda.is_available()
    print(f"[demo] ComfyUI: {comfyui} ({'CPU' if cpu else 'GPU'}); starting the server on 127.0.0.1 …")
    server = ComfyServer(python, comfyui, None, cpu=cpu, log_path=REPO / ".kiln" / "demo-server.log")
    try:
        print(f"[demo] server up in {server.start_seconds:.1f}s at {server.url} (log: {server.log_path})")
        prepare(comfyui, server, workflow, cpu)
        prepare_examples(server, args.examples)
        if "KilnTrainSD1" not in server.get("/object_info/KilnTrainSD1"):
            print("[demo] Kiln's nodes are not loaded in this ComfyUI; see the log above", file=sys.stderr)
            return 1
        client_id = uuid.uuid4().hex
        prompt_id = server.post_prompt(workflow, client_id=client_id)
        print(f"[demo] queued prompt {prompt_id}")
        asyncio.run(asyncio.wait_for(follow(server, prompt_id, client_id), args.timeout))
        entry = server.wait(prompt_id, timeout=args.timeout)
        lora = server.loras_dir / (workflow["7"]["inputs"]["filename"] + ".safetensors")
        from safetensors import safe_open
        with safe_open(str(lora), "pt") as f:
            meta, n = f.metadata(), len(list(f.keys()))
        print(f"[demo] done: {lora} ({n} tensors, {lora.stat().st_size / 1e6:.2f} MB)")
        print(f"[demo] fixed-batch loss {float(meta['kiln_probe_loss_start']):.4f} -> {float(meta['kiln_probe_loss_end']):.4f}, "
              f"{float(meta['kiln_seconds_per_step']):.3f} s/step")
        images = [i["filename"] for o in entry["outputs"].values() for i in o.get("images", [])]
        print(f"[demo] samples and loss plot: {', '.join(images)} (in ComfyUI's temp folder)")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
