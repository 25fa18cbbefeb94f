"""Saved workflows keep loading. The frontend stores a node's widget values by position, so a widget that moved
or vanished would put a user's saved values on other inputs without a word. tests/fixtures/saved_workflows/ holds
the example workflows as Kiln 0.3 saved them, each with its API twin naming what every value was saved for; today's
node definitions must put every value back on that input, and accept it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from workflows import has_seed_control, is_widget, ordered_inputs

SAVED = Path(__file__).resolve().parents[1] / "fixtures" / "saved_workflows"


def widget_slots(info: dict) -> list[tuple[str | None, list]]:
    """(input name, spec) per widgets_values position; None for the frontend's control-after-generate value."""
    slots = []
    for name, spec in ordered_inputs(info):
        if is_widget(spec):
            slots.append((name, spec))
            if has_seed_control(name, spec):
                slots.append((None, spec))
    return slots


def accepted(value, spec: list) -> bool:
    """Would the input take this value as saved: a choice it offers, a number within its range, the right type."""
    kind, opts = spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list) or kind == "COMBO":
        return value in (kind if isinstance(kind, list) else opts.get("options", []))
    if kind in ("INT", "FLOAT"):
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and opts.get("min", value) <= value <= opts.get("max", value))
    return isinstance(value, {"BOOLEAN": bool, "STRING": str}.get(kind, object))


@pytest.mark.parametrize("name", sorted(p.name for p in SAVED.glob("*.json")))
def test_saved_values_land_on_their_inputs(comfy, name):
    ui = json.loads((SAVED / name).read_text())
    api = json.loads((SAVED / "api" / name).read_text())
    checked = 0
    for node in ui["nodes"]:
        if not node["type"].startswith("Kiln"):
            continue
        info = comfy.nodes.NODE_CLASS_MAPPINGS[node["type"]].GET_NODE_INFO_V1()
        slots, values = widget_slots(info), node["widgets_values"]
        assert len(values) <= len(slots), f"{name}: {node['type']} lost widgets: {len(values)} saved, {len(slots)} now"
        saved_inputs = api[str(node["id"])]["inputs"]
        for (input_name, spec), value in zip(slots, values):
            if input_name is None:
                assert value in ("fixed", "increment", "decrement", "randomize"), (name, node["type"], value)
                continue
            saved = saved_inputs.get(input_name)
            if isinstance(saved, list):  # fed by a link in the saved graph: the widget holds a placeholder
                continue
            if input_name in saved_inputs:
                assert value == saved, f"{name}: {node['type']}.{input_name} gets {value!r}, saved as {saved!r}"
            assert accepted(value, spec), f"{name}: {node['type']}.{input_name} refuses its saved value {value!r}"
            checked += 1
    assert checked, f"{name}: no Kiln widget value checked"
