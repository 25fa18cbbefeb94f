"""The real ComfyUI frontend in headless chromium: the example workflow opens, converts to exactly its
API twin, runs from the Queue button's code path, and Kiln's live loss chart fills while it trains."""
from __future__ import annotations

import asyncio
import base64
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


CHART_CHECK = """(() => {
  const n = app.graph.getNodeById(6), k = n.kiln, L = k.layout;
  const g = k.canvas.getContext("2d"), dpr = k.canvas.width / L.width;
  const rgb = (x, y) => Array.from(g.getImageData(Math.floor(x * dpr), Math.floor(y * dpr), 1, 1).data.slice(0, 3));
  // the colour nearest (x, y) within r CSS pixels, as its distance to the wanted colour
  const near = (x, y, r, want) => { let best = 1e9;
    for (let dx = -r; dx <= r; dx++) for (let dy = -r; dy <= r; dy++) {
      const c = rgb(x + dx, y + dy); best = Math.min(best, Math.hypot(c[0] - want[0], c[1] - want[1], c[2] - want[2])); }
    return best; };
  const overlaps = [];
  L.labels.forEach((a, i) => L.labels.slice(i + 1).forEach((b) => {
    if (a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h) overlaps.push([a.text, b.text]); }));
  const outside = L.labels.filter((a) => a.x < 0 || a.y < 0 || a.x + a.w > L.width || a.y + a.h > L.height).map((a) => a.text);
  const [left, top, right, bottom] = L.box;
  return {n: k.points.length, last: k.last, node_width: n.size[0], width: L.width, height: L.height,
          font: L.fontPx, box: L.box, ticks: L.stepTicks, saves: k.saves, val: k.val.map((v) => v[0]),
          lrs: k.lrs.map((v) => v[1]), overlaps, outside, labels: L.labels.map((a) => a.text),
          save_marker: L.saveX.map((x) => near(x, top - 4, 1, [110, 200, 220])),
          save_line_clear: near((L.saveX[0] + left) / 2, (top + bottom) / 2, 0, [110, 200, 220]),
          val_points: L.valXY.map(([x, y]) => near(x, y, 0, [90, 210, 122])),
          lr_line: L.lrY.map(([x, y]) => near(x, y, 1, [200, 110, 230])),
          png: k.canvas.toDataURL("image/png")};
})()"""


RECORD_HEADERS = """(() => { window.kilnHeaders = [];
  app.api.addEventListener("kiln.phase", () => setTimeout(() => {
    window.kilnHeaders.push(app.graph.getNodeById(6).kiln.layout.header); }, 0)); })()"""
# the Run button: inside the element with the test id, or (frontend 1.49) the button itself
RUN_BUTTON = """(() => { const r = document.querySelector(
  '[data-testid="queue-button"] button, button[data-testid="queue-button"]').getBoundingClientRect();
  return [r.left + r.width / 2, r.top + r.height / 2]; })()"""
NODE_TEXT = """(() => { const t = app.graph.getNodeById(NID).kilnText, r = t.box.getBoundingClientRect();
  const warn = [...t.box.children].find((d) => d.textContent.startsWith("⚠"));
  return {text: t.text, warnings: Number(t.box.dataset.warnings), amber: warn ? getComputedStyle(warn).color : null,
          shown: t.box.isConnected && getComputedStyle(t.box).display !== "none" && r.height > 0 && r.bottom > 0
                 && r.top < innerHeight && r.right > 0 && r.left < innerWidth}; })()"""


def test_workflow_opens_queues_and_draws_the_loss_chart(ready_server):
    """The live chart at the node's default size: a step axis with ticks, smoothed over raw loss, the learning
    rate (cosine with warmup) on its own axis, validation points and a save marker, every label inside the chart
    and none overlapping another; the pixels of each mark where the chart's own mapping puts it."""
    steps = 12  # set in the page before queueing: the full example run is the e2e test's job
    settings = {"steps": steps, "sample_every": 6, "save_every_n_steps": 6, "save_name": "kiln/chart_test",
                "lr_scheduler": "cosine", "warmup_steps": 3,
                "training_args": "validation_split=0.25 validate_every_n_steps=4"}

    async def run():
        async with Browser(free_port()) as b:
            await b.open_app(ready_server.url)
            await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 30)
            await b.load_graph(UI)
            prompt = await b.evaluate("app.graphToPrompt().then(p => p.output)")
            assert strip_meta(prompt) == strip_meta(API), "the UI workflow does not convert to its API twin in the real frontend"
            widgets = await b.evaluate("app.graph.getNodeById(6).widgets.map(w => w.name)")
            await b.evaluate(f"(() => {{ const n = app.graph.getNodeById(6); const s = {json.dumps(settings)}; "
                             f"for (const [k, v] of Object.entries(s)) n.widgets.find(w => w.name === k).value = v; }})()")
            await b.evaluate(RECORD_HEADERS)
            await click(b, *await b.evaluate(RUN_BUTTON))  # the Run button, as a person queues it
            await b.wait_for("(app.graph.getNodeById(6).kiln?.points.length ?? 0) >= 8", 300, 0.5)
            await b.evaluate("(() => { app.canvas.ds.scale = 1; const n = app.graph.getNodeById(6); "
                             "app.canvas.ds.offset = [-n.pos[0] + 420, -n.pos[1] - n.size[1] + 800]; "
                             "app.canvas.setDirty(true, true); })()")
            await asyncio.sleep(1)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await b.screenshot(SCREENSHOTS / "train_node_mid_run.png")  # docs/images/train-node-mid-run.png
            room = await b.evaluate("(() => { const n = app.graph.getNodeById(6); "  # below the last widget
                                    "const c = n.widgets.find(w => w.name === 'kiln_loss'); "
                                    "return n.size[1] - (c.y + c.computedHeight); })()")
            await b.wait_for(f"(app.graph.getNodeById(6).kiln?.points.length ?? 0) >= {steps}", 300, 0.5)
            await b.wait_for("app.graph.getNodeById(7).kilnText?.text.includes('saved')", 300, 0.5)
            texts = {}
            for nid in (2, 3, 6, 7):  # each node in view, its text box drawn on screen
                await b.evaluate(f"(() => {{ app.canvas.ds.scale = 1; const n = app.graph.getNodeById({nid}); "
                                 f"app.canvas.ds.offset = [-n.pos[0] + 40, -n.pos[1] - n.size[1] + 700]; "
                                 f"app.canvas.setDirty(true, true); }})()")
                await asyncio.sleep(0.7)
                texts[nid] = await b.evaluate(NODE_TEXT.replace("NID", str(nid)))
            headers = await b.evaluate("window.kilnHeaders")
            await b.evaluate("(() => { app.canvas.ds.scale = 1; const n = app.graph.getNodeById(6); "
                             "app.canvas.ds.offset = [-n.pos[0] + 420, -n.pos[1] - n.size[1] + 760]; "
                             "app.canvas.setDirty(true, true); })()")
            await asyncio.sleep(1)
            chart = await b.evaluate(CHART_CHECK)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await b.screenshot(SCREENSHOTS / "train_node_loss_chart.png")
            (SCREENSHOTS / "loss_chart_canvas.png").write_bytes(base64.b64decode(chart.pop("png").split(",", 1)[1]))
            return widgets, chart, texts, headers, room, b.console
    widgets, chart, texts, headers, room, console = asyncio.run(run())
    assert room >= 200, room  # the mid-run sample preview is drawn inside the node's frame
    # every node's text on screen after the run: the dataset summary, the alpha warning standing out, the file
    for nid, t in texts.items():
        assert t["shown"], (nid, t)
    assert "images" in texts[2]["text"], texts[2]
    assert "no alpha channel" in texts[3]["text"] and texts[3]["warnings"] >= 1 and texts[3]["amber"], texts[3]
    assert "steps in" in texts[6]["text"], texts[6]
    assert "saved" in texts[7]["text"] and "chart_test" not in texts[7]["text"], texts[7]
    # the chart's header named the phases: the text encoders' outputs, the mid-run and final previews, the save
    assert any(h.startswith("caching") for h in headers), headers
    assert any(h.startswith("sampling 1/1") and "ETA" in h for h in headers), headers
    assert any(h.startswith("saving") for h in headers), headers
    assert "kiln_loss" in widgets
    assert chart["n"] == steps and chart["last"]["step"] == steps
    # readable at the node's default size: the chart spans the node, labels >= 10 px, inside, apart
    assert chart["node_width"] - 40 <= chart["width"] <= chart["node_width"], chart
    assert chart["font"] >= 10 and not chart["overlaps"] and not chart["outside"], chart
    left, top, right, bottom = chart["box"]
    assert right - left >= 200 and bottom - top >= 100, chart["box"]
    assert len(chart["ticks"]) >= 4 and chart["ticks"][-1] <= steps and {str(t) for t in chart["ticks"]} <= set(chart["labels"])
    # the data: saves after steps 6 and 12 (kohya also writes the last step's), validation every 4 steps, cosine lr
    # rising over the warmup then falling
    assert chart["saves"] == [6, 12] and {4, 8, 12} <= set(chart["val"])  # (and at epoch ends, as kohya)
    lrs = chart["lrs"]
    assert lrs[0] < lrs[2] and lrs[2] > lrs[-1] and len(lrs) == steps
    # and their pixels (distance in RGB to the mark's colour; 0 = exact, anti-aliased lines a little off)
    assert max(chart["save_marker"]) < 30 and chart["save_line_clear"] > 60, chart
    assert max(chart["val_points"]) < 30, chart["val_points"]
    assert max(chart["lr_line"]) < 60, chart["lr_line"]
    assert not [c for c in console if "kiln" in c.lower() and ("error" in c.lower() or "EXCEPTION" in c)], console


def test_every_example_workflow_opens_and_converts_to_its_twin(ready_server):
    """The SDXL / SD3 / masked / DreamBooth examples too: the real frontend turns each UI file into exactly its
    API twin, and every Train node carries the live loss chart."""
    names = sorted(p.name for p in (REPO / "example_workflows").glob("*.json"))

    async def run():
        results = {}
        async with Browser(free_port()) as b:
            await b.open_app(ready_server.url)
            await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 30)
            for name in names:
                ui = json.loads((REPO / "example_workflows" / name).read_text())
                await b.load_graph(ui)
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


VISIBLE = """((type) => {
  const n = typeof type === 'string' ? LiteGraph.createNode(type) : app.graph.getNodeById(type);
  if (!n.graph) app.graph.add(n);
  const names = () => n.widgets.filter(w => n.isWidgetVisible(w) && w.name !== 'kiln_loss' && w.type !== 'button')
    .map(w => w.name);
  return {id: n.id, names: names(), button: n.kilnAdvanced?.button.label ?? null};
})"""

CLICK_BUTTON = """((id) => {
  const n = app.graph.getNodeById(id), b = n.kilnAdvanced.button;
  app.canvas.ds.scale = 1; app.canvas.ds.offset = [-n.pos[0] + 40, -n.pos[1] + 60]; app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const r = app.canvas.canvas.getBoundingClientRect();
  const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + b.y + 10]);
  return [r.left + x, r.top + y];
})"""


async def click(b, x: float, y: float) -> None:
    for kind in ("mousePressed", "mouseReleased"):
        await b.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        await asyncio.sleep(0.1)


def test_train_nodes_show_a_dozen_inputs_and_the_rest_one_click_away(ready_server):
    """A new Train node shows the registry's SHOWN widgets (+ seed's control widget); one click on its button shows
    every input; a saved workflow keeps every widget value in its position and shows what it sets away from the
    defaults."""
    nodes = ("KilnTrainSD1", "KilnTrainSDXL", "KilnTrainSD3", "KilnTrainFlux", "KilnTrainDreamBooth")

    async def run():
        out = {}
        async with Browser(free_port()) as b:
            await b.open_app(ready_server.url)
            await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 30)
            for node in nodes:
                await b.evaluate("app.graph.clear()")
                before = await b.evaluate(f"{VISIBLE}({json.dumps(node)})")
                await click(b, *await b.evaluate(f"{CLICK_BUTTON}({before['id']})"))
                after = await b.evaluate(f"{VISIBLE}({before['id']})")
                total = await b.evaluate(f"app.graph.getNodeById({before['id']}).widgets.filter(w => !['kiln_loss', "
                                         f"'kiln_text'].includes(w.name) && w.type !== 'button').length")
                out[node] = (before, after, total)
            await b.load_graph(UI)
            saved = await b.evaluate("app.graph.serialize().nodes.filter(n => n.type === 'KilnTrainSD1')"
                                     ".map(n => n.widgets_values)[0]")
            shown = await b.evaluate(f"{VISIBLE}(6)")
            return out, saved, shown
    out, saved, shown = asyncio.run(run())
    counts = {node: (len(before["names"]), len(after["names"]), total) for node, (before, after, total) in out.items()}
    print("visible widgets by default, after the click, all:", counts)
    for node, (before, after, total) in out.items():
        assert 10 <= len(before["names"]) <= 14, (node, before)
        assert {"steps", "learning_rate", "seed", "sample_prompts"} <= set(before["names"]), before
        assert before["button"].startswith("▸ show"), before
        assert len(after["names"]) == total and after["button"].startswith("▾ hide"), (node, after)
    train = next(n for n in UI["nodes"] if n["type"] == "KilnTrainSD1")
    assert saved == train["widgets_values"], "the saved widget values moved"
    # the example sets the advanced sample_steps 8 and sample_cfg 5: what it sets away from a default is in sight
    assert {"sample_steps", "sample_cfg"} <= set(shown["names"]) and "grad_accum" not in shown["names"], shown
