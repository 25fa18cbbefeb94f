"""The inputs and outputs every Train node declares, made from the option registry (trainer_core/options/registry.py):
each node's widgets are its registry layout, in the order saved workflows hold their values."""
from __future__ import annotations

from comfy_api.latest import io

from ..trainer_core.options import registry
from ..trainer_core.options.registry import Option
from ..trainer_core.options.training_args import describe as describe_training_args
from . import tooltips as tips
from .comfy.compat import mark_advanced
from .types import KilnDatasetType, KilnLoraConfigType, KilnLoraType


def widget_input(o: Option, family: str):
    """The ComfyUI input of one registry widget; advanced (hidden until asked for) unless registry.SHOWN lists it."""
    spec = _widget_input(o, family)
    return spec if o.name in registry.SHOWN else mark_advanced(spec)


def _widget_input(o: Option, family: str):
    common = {"default": o.default, "optional": o.optional, "tooltip": o.help or None}
    if o.name == "training_args":
        common["tooltip"] = f"{o.help} Keys:\n" + describe_training_args(family)
    if o.kind == "int":
        return io.Int.Input(o.name, min=o.low, max=o.high, **o.extra, **common)
    if o.kind == "float":
        return io.Float.Input(o.name, min=o.low, max=o.high, step=o.step, **common)
    if o.kind == "bool":
        return io.Boolean.Input(o.name, **common)
    if o.kind == "choice":
        return io.Combo.Input(o.name, options=list(o.choices), **common)
    return io.String.Input(o.name, multiline=o.kind == "text", **common)


def node_widgets(kind: str, family: str) -> list:
    """Node ``kind``'s widget inputs (``family``: the training_args keys its tooltip lists)."""
    return [widget_input(o, family) for o in registry.widgets(kind)]


def train_outputs() -> list:
    return [
        io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
        KilnLoraType.Output(display_name="lora"),
        io.Image.Output(display_name="samples"),
        io.Image.Output(display_name="loss_plot"),
        io.Clip.Output(display_name="clip", tooltip="The input CLIP with the text-encoder LoRA applied (as given when "
                                                   "only the UNet trains)."),
    ]


def train_schema(node_id: str, display_name: str, description: str, family: str) -> io.Schema:
    """The schema every Train LoRA node shares: MODEL, CLIP, dataset and LoRA config in, its family's widgets, the
    same outputs."""
    return io.Schema(
        node_id=node_id, display_name=display_name, category="Kiln", description=description,
        inputs=[io.Model.Input("model", tooltip=tips.MODEL), io.Clip.Input("clip", tooltip=tips.CLIP),
                KilnDatasetType.Input("dataset", tooltip=tips.TRAIN_DATASET),
                KilnLoraConfigType.Input("lora_config", tooltip=tips.LORA_CONFIG)] + node_widgets(family, family),
        outputs=train_outputs(), hidden=[io.Hidden.unique_id, io.Hidden.prompt], not_idempotent=False)
