"""Every input of every Kiln node has a tooltip, as the frontend receives it: the node infos ComfyUI's /object_info
serves (GET_NODE_INFO_V1, the call the server makes), walked the same way."""
import docs  # scripts/docs.py (scripts/ is on sys.path via conftest)


def test_every_kiln_input_has_a_tooltip(comfy):
    infos = docs.node_infos(comfy.node_class_mappings())
    assert len(infos) >= 14
    missing = [f"{info['name']}.{name}" for info in infos
               for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()
               if not (len(spec) > 1 and str(spec[1].get("tooltip") or "").strip())]
    assert not missing, f"inputs without a tooltip: {', '.join(missing)}"


def test_train_nodes_show_the_registry_shown_widgets_and_mark_the_rest_advanced(comfy):
    """The frontend hides "advanced" inputs until asked: each Train node's non-advanced widgets are exactly the
    registry's SHOWN ones it has, and the sockets stay visible."""
    registry = comfy.pack_module("trainer_core.options.registry")
    infos = {i["name"]: i for i in docs.node_infos(comfy.node_class_mappings())}
    for node, kind in (("KilnTrainSD1", "sd1"), ("KilnTrainSDXL", "sdxl"), ("KilnTrainSD3", "sd3"),
                       ("KilnTrainDreamBooth", "dreambooth")):
        inputs = {n: s for section in ("required", "optional") for n, s in infos[node]["input"].get(section, {}).items()}
        shown = [n for n in registry.LAYOUTS[kind] if not inputs[n][1].get("advanced")]
        assert shown == [n for n in registry.LAYOUTS[kind] if n in registry.SHOWN], node
        assert len(shown) <= 12, node
        assert not [n for n, s in inputs.items() if n not in registry.LAYOUTS[kind] and s[1].get("advanced")], node
