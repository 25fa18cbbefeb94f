"""The dataset preview in the real ComfyUI frontend (headless chromium): queued from the page, Load Dataset, Alpha/Mask
Source and Dataset from Images (fed by ComfyUI's own folder loader and stock mask nodes) each show the preview grid
on the node, and the grid is the one their `preview` output hands to Preview Image."""
from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures.datasets import make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Browser  # noqa: E402
from comfy_server import free_port  # noqa: E402  (scripts/ is on sys.path via conftest)
from workflows import api_to_ui  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".kiln" / "screenshots"
BUCKETS = {"resolution": 64, "batch_size": 2, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
           "bucket_reso_steps": 32, "bucket_no_upscale": False}
GRAPH = {
    "1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "kiln_demo/train/5_kiln toy"}},
    "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "red"}},
    "3": {"class_type": "ThresholdMask", "inputs": {"mask": ["2", 0], "value": 0.1}},
    "4": {"class_type": "KilnDatasetFromImages", "inputs": {"images": ["1", 0], "masks": ["3", 0], "captions": ["1", 1],
                                                            "repeats": 5, "class_tokens": "kiln toy", **BUCKETS,
                                                            "preview_images": 4}},
    "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}},
    "6": {"class_type": "KilnLoadDataset", "inputs": {"folder": "kiln_demo/train", "caption_extension": ".txt",
                                                      "class_tokens": "", "repeats": 1, **BUCKETS, "preview_images": 3}},
    "7": {"class_type": "KilnMaskSource", "inputs": {"dataset": ["6", 0], "mode": "folder", "mask_folder": "kiln_demo/masks",
                                                     "missing_mask_is_white": False, "dilation": 0, "preview_images": 2}},
    "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
}
TILE = 192 + 6  # a grid is columns * TILE + 6 pixels wide
TEXT_H = 2 * 18 + 12  # two lines of 18 px text under each row (trainer_core/report/dataset_preview.py)


@pytest.fixture(scope="module")
def ready_server(comfy_server):
    if not (comfy_server.input_dir / "kiln_demo" / "train").is_dir():
        make_dataset(comfy_server.input_dir / "kiln_demo")
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)
    return comfy_server


def test_dataset_nodes_show_their_preview_grid(ready_server):
    # a class token no other prompt of the session used: ComfyUI serves nodes whose inputs it has seen (e.g. the e2e
    # example's) from its cache, and this test is about nodes that run and report their preview
    graph = json.loads(json.dumps(GRAPH))
    token = f"kiln toy {uuid.uuid4().hex[:8]}"
    graph["4"]["inputs"]["class_tokens"] = graph["6"]["inputs"]["class_tokens"] = token
    ui = api_to_ui(graph, ready_server.get("/object_info"))

    async def run():
        async with Browser(free_port()) as b:
            await b.open_app(ready_server.url)
            await b.load_graph(ui)
            await b.evaluate("app.queuePrompt(0, 1)")
            ids = [4, 6, 7, 5, 8]
            # what the frontend draws a node's images from (node.imgs in older frontends are loaded from it)
            await b.wait_for(f"{ids}.every(i => (app.nodeOutputs?.[String(i)]?.images?.length ?? 0) > 0)", 180, 0.5)
            shown = await b.evaluate(f"Object.fromEntries({ids}.map(i => [i, app.nodeOutputs[String(i)].images[0]]))")
            await b.screenshot_node(4, SCREENSHOTS / "dataset_preview_node.png")
            return shown, b.console

    shown, console = asyncio.run(run())
    assert all(shown[k]["type"] == "temp" for k in shown), shown
    grids = {k: np.asarray(Image.open(ready_server.base_dir / "temp" / v.get("subfolder", "") / v["filename"]))
             for k, v in shown.items()}
    # Dataset from Images: 4 tiles in a row; Load Dataset 3; Alpha/Mask Source 2 (one row each, 198 px a tile)
    widths = {k: g.shape[1] for k, g in grids.items()}
    assert (widths["4"], widths["6"], widths["7"]) == (4 * TILE + 6, 3 * TILE + 6, 2 * TILE + 6), widths
    assert all(grids[k].shape[0] == TILE + TEXT_H + 6 for k in ("4", "6", "7"))
    # what the preview outputs handed to Preview Image is the grid the node shows
    for node, preview in (("4", "5"), ("7", "8")):
        assert np.abs(grids[node].astype(int) - grids[preview][..., :3]).max() <= 1
    assert not [c for c in console if "kiln" in c.lower() and ("error" in c.lower() or "EXCEPTION" in c)], console
