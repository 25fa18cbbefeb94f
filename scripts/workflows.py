"""Example workflows: API format is the source, the UI format (what the ComfyUI frontend opens, and
lists as templates) is derived from it with the node definitions of a running server.

    python scripts/workflows.py --server http://127.0.0.1:8188 [NAME ...]   # rewrite example_workflows/*.json, *.jpg

The UI twin is laid out here too: each node at the size ComfyUI's frontend gives it (measured in headless chromium,
tests/browser/cdp.py), in groups naming the stages (model, data, training, output), with room left below the
nodes that show images or text after a run, and the view it opens with (extra.ds) showing every node at >= 70 %
on a 1920x1080 window; a Note says what to change for a real run. The thumbnail beside each file (<name>.jpg,
what the template browser shows for a custom node's example) is a screenshot of the graph in that frontend.

tests/e2e/test_sd1_workflow.py checks that the committed UI files are what this produces; tests/browser/
test_example_layout.py checks the layout in the frontend.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_widget(spec: list) -> bool:
    """A widget on the node (a value in widgets_values), not a socket; forceInput makes a widget type a socket."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def has_seed_control(name: str, spec: list) -> bool:
    """The frontend adds a 'control after generate' widget after these INT inputs."""
    opts = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [(name, info["input"][group][name]) for group in ("required", "optional") for name in order.get(group, [])]


def depth_of(api: dict) -> dict[str, int]:
    """Column of each node: one right of its deepest input."""
    depth: dict[str, int] = {}

    def visit(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
            depth[nid] = 1 + max((visit(u) for u in ups), default=-1)
        return depth[nid]
    for nid in api:
        visit(nid)
    return depth


def api_to_ui(api: dict, object_info: dict) -> dict:
    depth = depth_of(api)
    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), None, None, name])
                out_links.setdefault((value[0], value[1]), []).append(len(links))
    for order, (nid, node) in enumerate(sorted(api.items(), key=lambda kv: (depth[kv[0]], int(kv[0])))):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in ordered_inputs(info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if is_widget(spec) and linked:  # a widget fed by a link: a socket named after its widget
                default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                widgets.append(default if default is not None else "")
                link = next(l for l in links if l[3] == int(nid) and l[6] == name)
                link[4], link[5] = len(inputs), "COMBO" if isinstance(spec[0], list) else spec[0]
                inputs.append({"name": name, "type": link[5], "widget": {"name": name}, "link": link[0]})
            elif is_widget(spec):
                widgets.append(value if name in node["inputs"] else spec[1].get("default") if len(spec) > 1 else None)
                if has_seed_control(name, spec):
                    widgets.append("fixed")  # the frontend's extra "control after generate" widget
            else:
                link = next((l for l in links if l[3] == int(nid) and l[6] == name), None)
                if link is not None:
                    link[4] = len(inputs)
                    link[5] = spec[0]
                inputs.append({"name": name, "type": spec[0], "link": link[0] if link else None})
        outputs = [{"name": oname, "type": otype, "slot_index": i, "links": out_links.get((nid, i), [])}
                   for i, (otype, oname) in enumerate(zip(info["output"], info["output_name"]))]
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": [40 + 380 * col, 40 + 330 * row], "size": [340, 280],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    return {
        "last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes,
        "links": [l[:6] for l in links], "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


# --- templates: title, one-line description, and what to change for a real run --------------------------------

FAMILY_VALUES = {
    "sd1": "SD1.5: resolution 512, buckets 256-1024 (step 64); LoRA rank 16-32, alpha rank/2; learning_rate 1e-4 "
           "(text_encoder_lr 5e-5); batch 2-4; steps about images x repeats x 10 / batch (1500-3000).",
    "sdxl": "SDXL: resolution 1024, buckets 512-2048 (step 64); LoRA rank 16-32; learning_rate 1e-4, text encoders "
            "off or 1e-5; batch 1-2 with gradient_checkpointing; steps 2000-3000.",
    "sd3": "SD3: resolution 1024, buckets 512-1536 (step 64); LoRA rank 16; learning_rate 5e-5 to 1e-4; batch 1-2 "
           "with gradient_checkpointing and cached text encoder outputs; steps 1500-3000.",
    "flux": "FLUX.1 dev (kohya's recommended settings): resolution 1024, buckets 256-2048 (step 64), batch 1; LoRA "
            "rank 16, alpha 1; learning_rate 1e-4; timestep_sampling shift, discrete_flow_shift 3.1582, "
            "model_prediction_type raw, guidance_scale 1.0 (Chroma: sigmoid, guidance_scale 0); "
            "gradient_checkpointing; under 24 GB: weight_dtype fp8_e4m3fn with training_args fp8_base=true; "
            "steps 1000-2000.",
    "dreambooth": "Full fine-tune (SD1.5): resolution 512; learning_rate 1e-6 to 5e-6; steps 800-2000; about 200 "
                  "class images in the regularization folder, prior_loss_weight 1.0; saves a whole checkpoint.",
}
CHECKPOINT = {"sd1": "your SD1.5 checkpoint", "dreambooth": "your SD1.5 checkpoint",
              "sdxl": "your SDXL checkpoint", "sd3": "your SD3/3.5 checkpoint (with its text encoders)",
              "flux": "flux1-dev.safetensors (or schnell, Chroma) in models/diffusion_models"}
LOADER = {"flux": "Load Diffusion Model"}  # the node that loads the model, where it is not Load Checkpoint
TEMPLATES = {  # name: (title, one-line description, family, what Load Checkpoint should load if not CHECKPOINT's)
    "sd1_lora": ("Train a LoRA (SD1)", "The quick start: a LoRA on a captioned image folder, with a live loss "
                 "chart, samples and a loss plot.", "sd1", ""),
    "sd1_images_lora": ("LoRA from ComfyUI images (SD1)", "Train from IMAGE/MASK/caption sockets (ComfyUI's Load "
                        "Image-Text loader, a mask from a threshold) instead of a folder.", "sd1", ""),
    "sd1_masked_lora": ("Masked LoRA (SD1)", "Masked loss: only what a mask from the mask folder covers trains, "
                        "normalised by mask area.", "sd1", ""),
    "sd1_reg_images": ("LoRA with generated class images (SD1)", "Make Regularization Images draws class images "
                       "with the base model and feeds them to Load Dataset (prior preservation).", "sd1", ""),
    "sd1_compare_loras": ("Compare LoRA saves (SD1)", "Train with an intermediate save and a validation split, then "
                          "draw a grid comparing the saves on the same prompts.", "sd1", ""),
    "sd1_dreambooth_reg": ("DreamBooth LoRA with class images (SD1)", "A LoRA with prior preservation: a "
                           "regularization folder of class images weighted by prior_loss_weight.", "sd1", ""),
    "sd1_dreambooth_full": ("DreamBooth full fine-tune (SD1)", "Fine-tune the whole model with class images and "
                            "save a checkpoint.", "dreambooth", ""),
    "sdxl_lora": ("Train a LoRA (SDXL)", "A LoRA on an SDXL-family model (UNet only).", "sdxl", ""),
    "sdxl_lokr": ("Train a LoKr (SDXL)", "LyCORIS LoKr (Kronecker factors) on SDXL: smaller files than a LoRA of "
                  "the same capacity.", "sdxl", ""),
    "sd3_lora": ("Train a LoRA (SD3)", "A LoRA on SD3's MMDiT from an all-in-one checkpoint, per-layer ranks in "
                 "network_args.", "sd3", ""),
    "sd3_lora_separate_te": ("SD3 LoRA, separate text encoders", "SD3 as kohya's guide loads it: the model file "
                             "plus CLIP-L and CLIP-G files (DualCLIPLoader).", "sd3",
                             "the SD3 model file; DualCLIPLoader: clip_l and clip_g from models/text_encoders"),
    "flux_lora": ("Train a LoRA (FLUX.1)", "A LoRA on FLUX.1 dev as kohya's flux_train_network guide trains it: "
                  "the model, CLIP-L + T5-XXL and the ae VAE from separate files, kohya's recommended settings.",
                  "flux", ""),
}
# examples that name the real model files (no tiny twin the demo makes): their tests swap the tiny fixtures in
REAL_MODELS = {"flux_lora": "flux1-dev.safetensors in models/diffusion_models; clip_l.safetensors and "
                            "t5xxl_fp16.safetensors in models/text_encoders; ae.safetensors in models/vae"}


DATA_LINE = {"sd1_images_lora": "- Load Image-Text (from Folder): folder (under input/); Dataset from Images: "
                                 "resolution and buckets"}


def note_text(name: str) -> str:
    """The Note every example carries: what it is, what to change for a real run, typical values, what it loads."""
    title, description, family, checkpoint = TEMPLATES[name]
    demo = ("bash scripts/demo.sh --examples makes the tiny SDXL and SD3 test models this example names"
            if family in ("sdxl", "sd3") else "bash scripts/demo.sh makes the tiny test model and images it names")
    opens = (f"As it opens it loads the real files: {REAL_MODELS[name]}." if name in REAL_MODELS
             else f"As it opens it runs on test data: {demo}.")
    return "\n".join([
        title, description, "",
        "For a real run, change:",
        f"- {LOADER.get(family, 'Load Checkpoint')}: {checkpoint or CHECKPOINT[family]}",
        DATA_LINE.get(name, "- Load Dataset: folder (under ComfyUI's input/), resolution and buckets"),
        "- Train: learning_rate, steps, sample_prompts (your trigger word)",
        "- Save: filename", "",
        "Typical values: " + FAMILY_VALUES[family], "",
        opens])


# --- layout ------------------------------------------------------------------------------------------------

STAGES = ("model", "data", "training", "output")  # left to right, one group each
STAGE_COLOURS = {"model": "#3f5159", "data": "#3f593f", "training": "#59503f", "output": "#4f3f59"}
MODEL_NODES = {"CheckpointLoaderSimple", "DualCLIPLoader", "CLIPLoader", "UNETLoader", "VAELoader", "KilnLoraConfig"}
# room kept free below a node for what it shows after a run, as the frontend grows it (tests/browser/
# test_example_layout.py feeds each node a run's outputs and measures): an image preview below the widgets, and on
# every Kiln node its text (summary, warnings, the saved path). Preview Image nodes draw inside their own size.
IMAGE_NODES = {"KilnLoadDataset", "KilnMaskSource", "KilnDatasetFromImages", "KilnCompareLoras"}
IMAGE_ROOM = 290  # the frontend's image preview: about 272 px at a node's width
TRAIN_ROOM = 240 + 40  # kiln.js PREVIEW_ROOM (the sample preview) and a margin
TEXT_ROOM = 90  # about five lines of node text
PREVIEW_SIZE = [380, 290]  # a Preview Image node: the 400x240 loss plot nearly at full size
NOTE_SIZE = [360, 470]
MIN_WIDTH = 320  # every node at least this wide: columns line up
TRAIN_WIDTH = 400  # the Train node's loss chart: step ticks every ~80 px, labels apart
# a node measured wider than MIN_WIDTH is as wide as its title, and a newer frontend (1.49) measures a title wider
# than 0.3.75's does (358 -> 378 px) and widens the node to it: such a node is saved this much wider, so that the
# newer frontend draws it at the saved width and the next column stays clear
TITLE_ROOM = 1.1
TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT
GAP, GROUP_PAD, GROUP_TITLE = 24, 12, 40
MAX_COLUMN = 1250  # a stage's column (rooms included) wraps below this height
VIEW = {"width": 1920, "height": 1080}  # the window the examples are laid out for
FREE = (90, 135, 30, 20)  # left, top, right, bottom pixels of that window the frontend's bars cover, and margins
MAX_SCALE = 0.9


def room_below(node_type: str) -> int:
    """Space a node may grow into after a run (previews, node text), kept free below it."""
    room = IMAGE_ROOM if node_type in IMAGE_NODES else TRAIN_ROOM if node_type.startswith("KilnTrain") else 0
    if node_type.startswith("Kiln"):
        room += TEXT_ROOM
    return room


def stage_of(ui: dict) -> dict[int, str]:
    """Each node's stage: Train nodes train, what they feed is output, loaders of model parts are model, the
    rest prepares data."""
    feeds: dict[int, set[int]] = {}
    for _id, src, _s, dst, _d, _t in ui["links"]:
        feeds.setdefault(src, set()).add(dst)
    types = {n["id"]: n["type"] for n in ui["nodes"]}
    stage = {nid: "training" for nid, t in types.items() if t.startswith("KilnTrain")}
    todo = [d for t in list(stage) for d in feeds.get(t, ())]
    while todo:
        nid = todo.pop()
        if nid not in stage:
            stage[nid] = "output"
            todo += feeds.get(nid, ())
    for nid, t in types.items():
        stage.setdefault(nid, "model" if t in MODEL_NODES else "data")
    return stage


def layout(ui: dict, sizes: dict[int, list[float]] | None = None, note: str | None = None) -> dict:
    """Place every node (in place) by stage, left to right, each stage a group of columns; add the Note."""
    sizes = sizes or {}
    stage = stage_of(ui)
    by_stage: dict[str, list[dict]] = {s: [] for s in STAGES}
    for node in ui["nodes"]:  # ui["nodes"] is in depth order already
        w, h = sizes.get(node["id"], node["size"])
        wide = TRAIN_WIDTH if node["type"].startswith("KilnTrain") else MIN_WIDTH
        if node["id"] in sizes and w > wide:
            w *= TITLE_ROOM
        if node["type"] == "PreviewImage":
            w, h = max(w, PREVIEW_SIZE[0]), max(h, PREVIEW_SIZE[1])
        node["size"] = [round(max(w, wide)), round(h)]
        by_stage[stage[node["id"]]].append(node)
    if note is not None:
        nid = max(n["id"] for n in ui["nodes"]) + 1
        ui["nodes"].append({"id": nid, "type": "Note", "pos": [0, 0], "size": list(NOTE_SIZE), "flags": {},
                            "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                            "title": "Read me: what to change", "properties": {}, "widgets_values": [note],
                            "color": "#432", "bgcolor": "#653"})
        ui["last_node_id"] = nid
        by_stage["model"].append(ui["nodes"][-1])  # below the model group (outside it): read first
    x, groups = 0.0, []
    for name in STAGES:
        columns: list[list[dict]] = [[]]
        height = 0.0
        for node in by_stage[name]:
            need = TITLE + node["size"][1] + room_below(node["type"])
            if columns[-1] and height + need > MAX_COLUMN:
                columns.append([])
                height = 0.0
            columns[-1].append(node)
            height += need + GAP
        left = x
        for column in columns:
            y = GROUP_TITLE + GROUP_PAD
            width = max((n["size"][0] for n in column), default=0.0)
            for node in column:
                node["pos"] = [x + GROUP_PAD, y + TITLE]
                y += TITLE + node["size"][1] + room_below(node["type"]) + GAP
            x += width + GROUP_PAD
        members = [n for n in by_stage[name] if n["type"] != "Note"]
        if members:
            bottom = max(n["pos"][1] + n["size"][1] + room_below(n["type"]) for n in members) + GROUP_PAD
            groups.append({"id": len(groups) + 1, "title": name.capitalize(), "color": STAGE_COLOURS[name],
                           "bounding": [left, 0.0, x + GROUP_PAD - left, bottom], "font_size": 24, "flags": {}})
        x += GROUP_PAD + 2 * GAP
    ui["groups"] = groups
    ui["extra"]["ds"] = opening_view(ui["nodes"], groups)
    return ui


def opening_view(nodes: list[dict], groups: list[dict]) -> dict:
    """The view the frontend opens the graph with (extra.ds): every node and group title on a 1920x1080 window,
    as large as fits (at most MAX_SCALE), clear of the frontend's bars (its fit-to-view would leave a quarter of
    the window empty). The room kept below the lowest nodes may run off the bottom."""
    x0 = min([n["pos"][0] for n in nodes] + [g["bounding"][0] for g in groups])
    y0 = min([n["pos"][1] - TITLE for n in nodes] + [g["bounding"][1] for g in groups])
    x1 = max([n["pos"][0] + n["size"][0] for n in nodes] + [g["bounding"][0] + g["bounding"][2] for g in groups])
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    left, top, right, bottom = FREE
    width, height = VIEW["width"] - left - right, VIEW["height"] - top - bottom
    scale = min(MAX_SCALE, width / (x1 - x0), height / (y1 - y0))
    # screen = (graph + offset) * scale: the nodes centred across, from the top of the free area down
    offset = [(left + (width - (x1 - x0) * scale) / 2) / scale - x0, top / scale - y0]
    return {"scale": round(scale, 4), "offset": [round(v, 1) for v in offset]}


# --- in the frontend: node sizes, and the thumbnail --------------------------------------------------------

SIZES = "app.graph.nodes.map(n => [n.id, [n.size[0], n.size[1]]])"
SCREEN_BOX = """(() => { const ds = app.canvas.ds; let b = [1e9, 1e9, -1e9, -1e9];
  for (const n of app.graph.nodes) { const r = n.boundingRect; b = [Math.min(b[0], r[0]), Math.min(b[1], r[1]),
    Math.max(b[2], r[0] + r[2]), Math.max(b[3], r[1] + r[3])]; }
  for (const g of app.graph.groups) { const r = g._bounding; b = [Math.min(b[0], r[0]), Math.min(b[1], r[1]),
    Math.max(b[2], r[0] + r[2]), Math.max(b[3], r[1] + r[3])]; }
  const [x0, y0] = ds.convertOffsetToCanvas([b[0], b[1]]), [x1, y1] = ds.convertOffsetToCanvas([b[2], b[3]]);
  return {scale: ds.scale, box: [x0, y0, x1, y1]}; })()"""


def browser_modules():
    """tests/browser/cdp.py's Browser (headless Debian chromium) and a free port."""
    sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests" / "browser")]
    from cdp import Browser
    from comfy_server import free_port
    return Browser, free_port


async def open_frontend(b, server: str) -> None:
    await b.send("Emulation.setDeviceMetricsOverride", **VIEW, deviceScaleFactor=1, mobile=False)
    await b.open_app(server)
    await b.wait_for("app.extensions.some(e => e.name === 'kiln.training')", 60)
    await b.evaluate("app.graph.clear()")


async def load(b, ui: dict) -> None:
    """As the template browser loads it (fit to view when the file has no saved view), and one frame drawn."""
    await b.load_graph(ui)
    await asyncio.sleep(0.6)


async def frontend_sizes(b, ui: dict) -> dict[int, list[float]]:
    """The size the frontend gives each node (its computeSize, with Kiln's widgets shown by default)."""
    small = {**ui, "nodes": [{**n, "size": [1, 1]} for n in ui["nodes"]]}
    await load(b, small)
    return {nid: size for nid, size in await b.evaluate(SIZES)}


async def thumbnail(b, ui: dict, out: Path, width: int = 640) -> float:
    """<name>.jpg: the graph as the frontend opens it, cropped to its groups, ``width`` px wide; the opening zoom."""
    from PIL import Image
    import base64
    await load(b, ui)
    await b.evaluate("document.querySelectorAll('[class*=minimap]').forEach(e => e.style.visibility = 'hidden')")
    view = await b.evaluate(SCREEN_BOX)
    png = base64.b64decode((await b.send("Page.captureScreenshot", format="png"))["data"])
    x0, y0, x1, y1 = view["box"]
    with Image.open(io.BytesIO(png)) as page:
        page = page.convert("RGB")
        crop = page.crop((max(0, int(x0) - 16), max(0, int(y0) - 16), min(page.width, int(x1) + 16),
                          min(page.height, int(y1) + 16)))
    crop = crop.resize((width, round(crop.height * width / crop.width)), Image.LANCZOS)
    crop.save(out, "JPEG", quality=82, optimize=True)
    return view["scale"]


def build(api: dict, object_info: dict, sizes: dict[int, list[float]] | None, name: str) -> dict:
    return layout(api_to_ui(api, object_info), sizes, note_text(name) if name in TEMPLATES else None)


def skip_first_run_dialog(server: str) -> None:
    """Marks the frontend's tour done on the server (a setting, as the browser tests do): its first-run templates
    dialog would cover the graph in the thumbnails."""
    req = urllib.request.Request(server + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()


async def regenerate(server: str, object_info: dict, names: list[str]) -> None:
    skip_first_run_dialog(server)
    Browser, free_port = browser_modules()
    async with Browser(free_port()) as b:
        await open_frontend(b, server)
        for name in names:
            api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
            sizes = await frontend_sizes(b, api_to_ui(api, object_info))
            ui = build(api, object_info, sizes, name)
            (EXAMPLES / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            scale = await thumbnail(b, ui, EXAMPLES / f"{name}.jpg")
            print(f"wrote {EXAMPLES / name}.json and .jpg (opens at {scale:.0%} on a 1920x1080 window)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="URL of a ComfyUI server with Kiln loaded")
    ap.add_argument("names", nargs="*", help="examples to rewrite (default: all of example_workflows/api)")
    args = ap.parse_args()
    url = args.server.rstrip("/")
    with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
        object_info = json.load(r)
    names = args.names or sorted(p.stem for p in (EXAMPLES / "api").glob("*.json"))
    asyncio.run(regenerate(url, object_info, names))


if __name__ == "__main__":
    main()
