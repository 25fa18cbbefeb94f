"""Take docs/images/train-node.png: the Train LoRA (SD1) node of example_workflows/sd1_lora.json in the real
ComfyUI frontend (headless Debian chromium), mid-run, with its live loss chart and a sample preview.

    set -a; . .kiln/env; set +a; "$KILN_PYTHON" scripts/screenshot.py [--out PATH] [--steps N]

Starts a headless ComfyUI server (CPU) with only this pack, the tiny generated SD1 checkpoint and the generated
image set (as the demo and the browser tests do), opens the workflow in the page, sets a longer run with sample
previews, an intermediate save and a validation loss, queues it from the page and photographs the node when most
of the steps are done. Needs chromium (apt-get install chromium). Several minutes on a CPU (the tiny model trains
at 64², its previews sample at 128²).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO / "tests" / "browser")]

from cdp import Browser  # noqa: E402
from comfy_server import ComfyServer, free_port  # noqa: E402

TRAIN = 6  # the Train LoRA (SD1) node's id in example_workflows/sd1_lora.json


def settings(steps: int) -> dict:
    """Widget values set in the page before queueing: enough steps for a chart with a shape, previews on the way."""
    return {"steps": steps, "sample_every": steps // 4, "save_every_n_steps": steps // 2, "lr_scheduler": "cosine",
            "warmup_steps": steps // 10, "sample_prompts": "a kiln toy --w 128 --h 128",
            "training_args": f"validation_split=0.25 validate_every_n_steps={steps // 4}"}


def start_server(base: Path) -> ComfyServer:
    """A CPU server over ``base`` with this pack, the tiny SD1 checkpoint and the demo's image set."""
    from fixtures import tiny_models
    from fixtures.datasets import make_dataset

    comfyui = os.environ["KILN_COMFYUI"]
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-kiln").symlink_to(REPO, target_is_directory=True)
    tiny_models.ensure_comfy_importable(comfyui)
    import comfy.options  # noqa: F401  (keeps ComfyUI's argv parsing off in this process)
    from comfy.cli_args import args
    args.cpu = True
    cache = REPO / ".kiln" / "fixtures"
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_models.build_sd1_checkpoint(str(cache / tiny_models.default_name("sd1")))
    server = ComfyServer(os.environ.get("KILN_PYTHON", sys.executable), Path(comfyui), base, cpu=True)
    server.install(Path(ckpt), "checkpoints")
    make_dataset(server.input_dir / "kiln_demo")
    server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run dialog over the graph
    return server


async def photograph(url: str, steps: int) -> tuple[bytes, list[float]]:
    """The page as PNG bytes once most steps are done and a preview shows, and the node's box in it."""
    ui = json.loads((REPO / "example_workflows" / "sd1_lora.json").read_text())
    async with Browser(free_port()) as b:
        await b.send("Emulation.setDeviceMetricsOverride", width=1400, height=1800, deviceScaleFactor=1, mobile=False)
        await b.open_app(url)
        await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 30)
        await b.load_graph(ui)
        await b.evaluate(f"(() => {{ const n = app.graph.getNodeById({TRAIN}); const s = {json.dumps(settings(steps))}; "
                         "for (const [k, v] of Object.entries(s)) n.widgets.find(w => w.name === k).value = v; })()")
        await b.evaluate("app.queuePrompt(0, 1)")
        await b.wait_for(f"(app.graph.getNodeById({TRAIN}).kiln?.points.length ?? 0) >= {int(steps * 0.85)} && "
                         f"app.graph.getNodeById({TRAIN}).imgs?.[0]?.naturalWidth > 0", 900, 0.5)
        box = await b.evaluate(f"""(() => {{
            const n = app.graph.getNodeById({TRAIN}), ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT;
            ds.scale = 1; ds.offset = [-n.pos[0] + 400, -n.pos[1] + title + 260]; app.canvas.setDirty(true, true);
            return [(n.pos[0] + ds.offset[0]) * ds.scale, (n.pos[1] - title + ds.offset[1]) * ds.scale,
                    n.size[0] * ds.scale, (n.size[1] + title) * ds.scale]; }})()""")
        await asyncio.sleep(1)
        png = (await b.send("Page.captureScreenshot", format="png"))["data"]
    import base64
    return base64.b64decode(png), box


def crop(png: bytes, box: list[float], out: Path, margin: int = 12) -> None:
    """The node (plus a margin) from the page, as a palette PNG (small enough for the README)."""
    from PIL import Image
    x, y, w, h = box
    with Image.open(io.BytesIO(png)) as page:
        node = page.convert("RGB").crop((int(x) - margin, int(y) - margin, int(x + w) + margin, int(y + h) + margin))
    out.parent.mkdir(parents=True, exist_ok=True)
    node.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "train-node.png")
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-screenshot-") as tmp:
        server = start_server(Path(tmp))
        try:
            png, box = asyncio.run(photograph(server.url, a.steps))
        finally:
            server.stop()
    crop(png, box, a.out)
    print(f"wrote {a.out} ({a.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
