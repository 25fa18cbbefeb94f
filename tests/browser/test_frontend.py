"""The real ComfyUI frontend in headless chromium: the example workflow opens, converts to exactly its
API twin, runs from the Queue button's code path, and Kiln's live loss chart fills while it trains."""
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
UI = json.loads((REPO / "example_workflows" / "sd1_lora.json").read_text())
API = json.loads((REPO / "example_workflows" / "api" / "sd1_lora.json").read_text())
SCREENSHOTS = REPO / ".kiln" / "screenshots"


def strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.fixture(scope="module")
def ready_server(comfy_server, server_sd1_checkpoint):
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run templates dialog over the graph
    return comfy_server


def test_workflow_opens_queues_and_draws_the_loss_chart(ready_server):
    steps = 12  # set in the page before queueing: the full example run is the e2e test's job

    async def run():
        async with Browser(free_port()) as b:
            await b.navigate(ready_server.url)
            await b.wait_for("window.app && window.app.graph && window.app.extensionManager !== undefined", 90)
            await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 30)
            await b.evaluate(f"app.loadGraphData({json.dumps(UI)})")
            prompt = await b.evaluate("app.graphToPrompt().then(p => p.output)")
            assert strip_meta(prompt) == strip_meta(API), "the UI workflow does not convert to its API twin in the real frontend"
            widgets = await b.evaluate("app.graph.getNodeById(6).widgets.map(w => w.name)")
            await b.evaluate(f"(() => {{ const n = app.graph.getNodeById(6); "
                             f"n.widgets.find(w => w.name === 'steps').value = {steps}; "
                             f"n.widgets.find(w => w.name === 'sample_every').value = 6; }})()")
            await b.evaluate("app.queuePrompt(0, 1)")
            await b.wait_for(f"(app.graph.getNodeById(6).kiln?.losses.length ?? 0) >= {steps}", 300, 0.5)
            chart = await b.evaluate("(() => { const k = app.graph.getNodeById(6).kiln; "
                                     "return {n: k.losses.length, last: k.last, h: k.canvas.height}; })()")
            await b.evaluate("(() => { app.canvas.ds.scale = 1; const n = app.graph.getNodeById(6); "
                             "app.canvas.ds.offset = [-n.pos[0] + 420, -n.pos[1] + 60]; app.canvas.setDirty(true, true); })()")
            await asyncio.sleep(1)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await b.screenshot(SCREENSHOTS / "train_node_loss_chart.png")
            return widgets, chart, b.console
    widgets, chart, console = asyncio.run(run())
    assert "kiln_loss" in widgets
    assert chart["n"] == steps and chart["last"]["step"] == steps and chart["h"] > 0
    assert not [c for c in console if "kiln" in c.lower() and ("error" in c.lower() or "EXCEPTION" in c)], console


def test_every_example_workflow_opens_and_converts_to_its_twin(ready_server):
    """The SDXL / SD3 / masked / DreamBooth examples too: the real frontend turns each UI file into exactly its
    API twin, and every Train node carries the live loss chart."""
    names = sorted(p.name for p in (REPO / "example_workflows").glob("*.json"))

    async def run():
        results = {}
        async with Browser(free_port()) as b:
            await b.navigate(ready_server.url)
            await b.wait_for("window.app && window.app.graph && window.app.extensionManager !== undefined", 90)
            await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 30)
            for name in names:
                ui = json.loads((REPO / "example_workflows" / name).read_text())
                await b.evaluate(f"app.loadGraphData({json.dumps(ui)})")
                prompt = await b.evaluate("app.graphToPrompt().then(p => p.output)")
                charts = await b.evaluate("app.graph._nodes.filter(n => n.type.startsWith('KilnTrain'))"
                                          ".map(n => n.widgets.some(w => w.name === 'kiln_loss'))")
                results[name] = (prompt, charts)
        return results, b.console

    results, console = asyncio.run(run())
    assert {"sdxl_lora.json", "sd3_lora.json"} <= set(results)
    for name, (prompt, charts) in results.items():
        api = json.loads((REPO / "example_workflows" / "api" / name).read_text())
        assert strip_meta(prompt) == strip_meta(api), name
        assert charts == [True], name
    assert not [c for c in console if "kiln" in c.lower() and ("error" in c.lower() or "EXCEPTION" in c)], console
