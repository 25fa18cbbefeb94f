"""The sd1_compare_loras example in the real ComfyUI frontend (headless chromium): opened from its UI file and
queued from the page, it trains with intermediate saves and validation, and Compare LoRAs shows its labelled grid
(base, step 20, final × strengths 0.5 and 1.0) on the node."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

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
            await b.navigate(comfy_server.url)
            await b.wait_for("window.app && window.app.graph && window.app.extensionManager !== undefined", 90)
            await b.evaluate(f"app.loadGraphData({json.dumps(ui)})")
            await b.evaluate("app.queuePrompt(0, 1)")
            # the node's own output (a temp file), not the sampling previews its progress bar showed before
            await b.wait_for("(app.graph.getNodeById(10).imgs?.length ?? 0) > 0 && app.graph.getNodeById(10).imgs[0]"
                             ".src.includes('type=temp') && app.graph.getNodeById(10).imgs[0].complete && "
                             "app.graph.getNodeById(10).imgs[0].naturalWidth > 0", 600, 1.0)
            shown = await b.evaluate("(() => { const im = app.graph.getNodeById(10).imgs[0]; "
                                     "return [im.naturalWidth, im.naturalHeight, im.src]; })()")
            await b.evaluate("(() => { app.canvas.ds.scale = 1; const n = app.graph.getNodeById(10); "
                             "app.canvas.ds.offset = [-n.pos[0] + 40, -n.pos[1] + 60]; app.canvas.setDirty(true, true); })()")
            await asyncio.sleep(1)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOTS / "compare_loras_node.png"
            await b.screenshot(shot)
            return shown, shot, b.console

    shown, shot, console = asyncio.run(run())
    # 3 rows (base, step 20, final) of 64 px under a 24 px label band; 2 columns of 64 px beside the row labels
    assert shown[1] == 24 + 3 * 64 and shown[0] > 2 * 64, shown
    assert "type=temp" in shown[2]
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size[0] > 400 and len(set(im.convert("L").getdata())) > 20  # the page with the grid drawn
    saved = sorted((comfy_server.loras_dir / "kiln").glob("sd1_compare-step*.safetensors"))
    assert [p.name for p in saved] == ["sd1_compare-step000020.safetensors"]
    assert not [c for c in console if "kiln" in c.lower() and ("error" in c.lower() or "EXCEPTION" in c)], console
