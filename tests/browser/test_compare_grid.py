"""The sd1_compare_loras example in the real ComfyUI frontend (headless chromium): opened from its UI file and
queued from the page, it trains with intermediate saves and validation, and Compare LoRAs shows its labelled grid
(base, step 20, final × strengths 0.5 and 1.0) on the node."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures.datasets import make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Browser  # noqa: E402
from comfy_server import free_port  # noqa: E402  (scripts/ is on sys.path via conftest)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".kiln" / "screenshots"


def test_compare_loras_example_shows_its_grid_on_the_node(comfy_server, server_sd1_checkpoint):
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)
    ui = json.loads((REPO / "example_workflows" / "sd1_compare_loras.json").read_text())

    async def run():
        async with Browser(free_port()) as b:
            await b.open_app(comfy_server.url)
            await b.load_graph(ui)
            await b.evaluate("app.queuePrompt(0, 1)")
            # what the frontend draws a node's images from (ComfyUI 0.3.75's frontend and 0.33's alike)
            await b.wait_for("(app.nodeOutputs?.['10']?.images?.length ?? 0) > 0", 600, 1.0)
            shown = await b.evaluate("app.nodeOutputs['10'].images[0]")
            shot = SCREENSHOTS / "compare_loras_node.png"
            await b.screenshot_node(10, shot)
            return shown, shot, b.console

    shown, shot, console = asyncio.run(run())
    assert shown["type"] == "temp", shown
    grid = np.asarray(Image.open(comfy_server.base_dir / "temp" / shown.get("subfolder", "") / shown["filename"]))
    # 3 rows (base, step 20, final) of 64 px under a 24 px label band; 2 columns of 64 px beside the row labels
    assert grid.shape[0] == 24 + 3 * 64 and grid.shape[1] > 2 * 64, grid.shape
    with Image.open(shot) as im:
        assert im.size[0] > 400 and len(set(im.convert("L").getdata())) > 20  # the page with the grid drawn
    saved = sorted((comfy_server.loras_dir / "kiln").glob("sd1_compare-step*.safetensors"))
    # kohya's series, the last step included; the grid shows that one once, as the final LoRA
    assert [p.name for p in saved] == ["sd1_compare-step00000020.safetensors", "sd1_compare-step00000040.safetensors"]
    assert not [c for c in console if "kiln" in c.lower() and ("error" in c.lower() or "EXCEPTION" in c)], console
