"""Every example workflow as the real frontend opens it on a 1920x1080 window: readable (zoom >= 70 %, every node
on screen, text drawn), no two nodes overlapping at the sizes the frontend gives them, and still none after a
run's outputs grow them (image previews, node text, the Train node's sample preview: fed through the frontend's
own 'executed' and 'kiln.phase' events); groups naming the stages. Opening zoom per example is printed."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Browser  # noqa: E402
from comfy_server import free_port  # noqa: E402  (scripts/ is on sys.path via conftest)
from workflows import FREE, IMAGE_NODES, VIEW  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
NAMES = sorted(p.stem for p in (REPO / "example_workflows" / "api").glob("*.json"))
SCREENSHOTS = REPO / ".kiln" / "screenshots"

OPENED = """(() => { const ds = app.canvas.ds, c = app.canvas.canvas;
  const screen = (n) => { const [x0, y0] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
    const [x1, y1] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]); return [x0, y0, x1, y1]; };
  return {scale: ds.scale, low_quality: app.canvas.low_quality ?? null, window: [innerWidth, innerHeight],
          canvas: [c.width / devicePixelRatio, c.height / devicePixelRatio],
          groups: app.graph.groups.map(g => g.title),
          nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, screen: screen(n)}))}; })()"""
# a run's outputs, as the server sends them: images on the nodes that show images, text on Kiln's nodes, and a
# Train node's sampling phase (kiln.js makes room for the sample preview)
RUN_OUTPUTS = """(async (imageNodes) => {
  for (const n of app.graph.nodes) {
    const output = {};
    if (n.type === "PreviewImage" || imageNodes.includes(n.type))
      output.images = [{filename: "kiln_grid.png", subfolder: "", type: "input"}];
    if (n.type.startsWith("Kiln")) output.text = ["8 images × 5 repeats = 40 per epoch\\n6 of 8 images have no alpha "
      + "channel: their masks are white\\nsaved /somewhere/models/loras/kiln/a_rather_long_file_name.safetensors"];
    if (Object.keys(output).length)
      app.api.dispatchCustomEvent("executed", {node: String(n.id), display_node: String(n.id), output, prompt_id: "t"});
    if (n.kiln) app.api.dispatchCustomEvent("kiln.phase", {node: String(n.id), phase: "sampling", step: 1, total: 2});
  }
  await new Promise(r => setTimeout(r, 1500)); app.canvas.draw(true, true);
  await new Promise(r => setTimeout(r, 500));
  return app.graph.nodes.map(n => ({id: n.id, type: n.type, rect: [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                                                 n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]}));
})"""


def overlaps(nodes: list[dict]) -> list[tuple]:
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a["type"], a["id"], b["type"], b["id"]))
    return out


@pytest.fixture(scope="module")
def layout_server(comfy_server):
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run templates dialog over the graph
    Image.new("RGB", (512, 256), (180, 90, 40)).save(comfy_server.input_dir / "kiln_grid.png")  # 4x2 preview grid
    return comfy_server


def test_examples_open_readable_with_no_overlaps(layout_server):
    async def run():
        results = {}
        async with Browser(free_port()) as b:
            await b.send("Emulation.setDeviceMetricsOverride", **VIEW, deviceScaleFactor=1, mobile=False)
            await b.open_app(layout_server.url)
            await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 60)
            for name in NAMES:
                ui = (REPO / "example_workflows" / f"{name}.json").read_text()
                await b.load_graph(ui, True, True, name)  # as Templates does
                await asyncio.sleep(0.8)
                opened = await b.evaluate(OPENED)
                opened["sizes"] = await b.evaluate("app.graph.nodes.map(n => ({id: n.id, type: n.type, rect: "
                                                   "[n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], "
                                                   "n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]}))")
                opened["after_run"] = await b.evaluate(f"{RUN_OUTPUTS}({json.dumps(sorted(IMAGE_NODES))})")
                results[name] = opened
        return results

    results = asyncio.run(run())
    print("opening zoom on a 1920x1080 window:", {n: round(r["scale"], 3) for n, r in results.items()})
    left, top, right, bottom = FREE
    for name, r in results.items():
        assert r["window"] == [VIEW["width"], VIEW["height"]], r["window"]
        assert r["scale"] >= 0.7 and r["low_quality"] in (False, None), (name, r["scale"], r["low_quality"])
        for n in r["nodes"]:  # on screen, clear of the sidebar and the top bars
            x0, y0, x1, y1 = n["screen"]
            assert x0 >= left - 1 and y0 >= top - 1 and x1 <= VIEW["width"] - right + 1 \
                and y1 <= VIEW["height"] - bottom + 1, (name, n)
        assert not overlaps(r["sizes"]), (name, overlaps(r["sizes"]))
        assert not overlaps(r["after_run"]), (name, "after a run", overlaps(r["after_run"]))
        assert {"Model", "Data", "Training", "Output"} <= set(r["groups"]), (name, r["groups"])
        grown = {n["id"]: n["rect"][3] for n in r["after_run"]}
        assert any(grown[n["id"]] > n["rect"][3] + 150 for n in r["sizes"] if n["type"].startswith("KilnTrain")), \
            "the run's outputs did not grow the Train node: the check above checked nothing"


CARDS = """(() => [...document.querySelectorAll("img[alt]")].filter(img => NAMES.includes(img.getAttribute("alt")))
  .map(img => { let card = img; while (card.parentElement && !card.innerText.includes("\\n")) card = card.parentElement;
    for (let i = 0; i < 6 && card.parentElement && card.parentElement.querySelectorAll("img[alt]").length === 1; i++)
      card = card.parentElement;
    return {name: img.getAttribute("alt"), text: card.innerText, loaded: img.naturalWidth > 0}; }))()"""


def test_template_cards_show_thumbnail_title_and_description(layout_server):
    """Workflow → Browse Templates → Extensions → comfyui-kiln: each card shows the example's thumbnail, title and
    one-line description (js/templates.js), not its file name."""
    from workflows import TEMPLATES

    async def run():
        async with Browser(free_port()) as b:
            await b.send("Emulation.setDeviceMetricsOverride", **VIEW, deviceScaleFactor=1, mobile=False)
            await b.open_app(layout_server.url)
            await b.wait_for("app.extensions.some(e => e.name === 'kiln.templates')", 60)
            await b.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            await b.wait_for("[...document.querySelectorAll('*')].some(e => e.children.length === 0 && "
                             "e.textContent.trim() === 'comfyui-kiln')", 30)
            await b.evaluate("[...document.querySelectorAll('*')].find(e => e.children.length === 0 && "
                             "e.textContent.trim() === 'comfyui-kiln').click()")
            await b.wait_for(f"{CARDS.replace('NAMES', json.dumps(NAMES))}.filter(c => c.loaded).length >= 4", 30)
            await asyncio.sleep(1)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await b.screenshot(SCREENSHOTS / "template_list.png")  # docs/images/template-list.png
            return await b.evaluate(CARDS.replace("NAMES", json.dumps(NAMES)))

    cards = asyncio.run(run())
    assert len(cards) >= 4, cards  # the cards in view (the dialog loads the rest as one scrolls)
    for card in cards:
        title, description, _family, _checkpoint = TEMPLATES[card["name"]]
        assert title in card["text"] and description[:30] in card["text"].replace("\n", " "), card
        assert card["name"] not in card["text"], card
        assert card["loaded"], card  # the thumbnail, <name>.jpg
