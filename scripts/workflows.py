"""Example workflows: API format is the source, the UI format (what the ComfyUI frontend opens, and
lists as templates) is derived from it with the node definitions of a running server.

    python scripts/workflows.py --server http://127.0.0.1:8188    # rewrite example_workflows/*.json

tests/e2e/test_sd1_workflow.py checks that the committed UI files are what this produces.
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="URL of a ComfyUI server with Kiln loaded")
    args = ap.parse_args()
    with urllib.request.urlopen(args.server.rstrip("/") + "/object_info", timeout=60) as r:
        object_info = json.load(r)
    for api_path in sorted((EXAMPLES / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_path.read_text()), object_info)
        (EXAMPLES / api_path.name).write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", EXAMPLES / api_path.name)


if __name__ == "__main__":
    main()
