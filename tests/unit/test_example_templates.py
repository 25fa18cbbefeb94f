"""Each example workflow is a template: a title and one-line description (scripts/workflows.py TEMPLATES), a Note
saying what to change for a real run with typical values, and the thumbnail ComfyUI's template browser shows for a
custom node's example (example_workflows/<name>.jpg beside <name>.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from workflows import LOADER, REAL_MODELS, TEMPLATES  # noqa: E402  (scripts/ is on sys.path via conftest)

REPO = Path(__file__).resolve().parents[2]
NAMES = sorted(p.stem for p in (REPO / "example_workflows" / "api").glob("*.json"))


def test_every_example_has_a_title_and_only_examples_are_listed():
    assert set(TEMPLATES) == set(NAMES)
    # ComfyUI lists every example_workflows/*.json as a template: nothing else may be a .json there
    assert sorted(p.stem for p in (REPO / "example_workflows").glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_example_has_a_note_and_a_thumbnail(name):
    ui = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, name
    text = notes[0]["widgets_values"][0]
    title, description, family, _needs = TEMPLATES[name]
    for what in (LOADER.get(family, "Load Checkpoint"), "folder", "resolution", "learning_rate", "steps",
                 "sample_prompts", "filename", "Typical values"):
        assert what in text, (name, what)
    assert text.startswith(title) and description in text
    assert {"Model", "Data", "Training", "Output"} <= {g["title"] for g in ui["groups"]}
    with Image.open(REPO / "example_workflows" / f"{name}.jpg") as thumb:
        assert thumb.format == "JPEG" and thumb.width >= 480 and thumb.height >= 200, thumb.size


def test_the_demo_set_up_makes_every_model_the_examples_name():
    """scripts/demo.sh (--examples for SDXL/SD3) makes each model file an example loads, where it loads it from;
    the examples that name the real files (REAL_MODELS: FLUX.1's T5-XXL has no tiny twin) say so in their Note."""
    from demo import example_models
    from fixtures import tiny_models

    made = set(example_models(tiny_models))
    folders = {"ckpt_name": "checkpoints", "clip_name1": "text_encoders", "clip_name2": "text_encoders"}
    for name in NAMES:
        if name in REAL_MODELS:
            ui = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
            assert any(REAL_MODELS[name] in n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note")
            continue
        api = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
        for node in api.values():
            for key, folder in folders.items():
                if isinstance(node["inputs"].get(key), str):
                    assert (folder, node["inputs"][key]) in made, (name, key, node["inputs"][key])


def test_docs_list_every_template_with_its_title_and_description():
    page = (REPO / "docs" / "workflows.md").read_text()
    for name, (title, description, _family, _checkpoint) in TEMPLATES.items():
        assert f"| `{name}.json` | {title} | {description} |" in page, name
