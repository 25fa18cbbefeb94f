"""LoRA Config and Save LoRA."""
from __future__ import annotations

import os

from comfy_api.latest import io, ui

import folder_paths

from ..trainer_core.errors import KilnError
from ..trainer_core.lora.config import ALGORITHMS, LoraConfig
from ..trainer_core.lora.io import DTYPES, TrainedLora, save_lora_file
from ..trainer_core.lora.network_args import parse_network_args
from .options import check_options, check_text
from .types import KilnLoraConfigType, KilnLoraType


class KilnLoraConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnLoraConfig",
            display_name="LoRA Config",
            category="Kiln",
            description="Shape of the LoRA: rank (network_dim), alpha (scale = alpha / rank), dropouts, conv LoRA.",
            inputs=[
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip="kohya network_dim."),
                io.Float.Input("alpha", default=16.0, min=0.0, max=1024.0, step=0.5, tooltip="kohya network_alpha; scale = alpha / rank. 0 = alpha equals rank (scale 1), as kohya reads it."),
                io.Int.Input("conv_rank", default=0, min=0, max=1024, tooltip="LoRA on 3x3 convolutions (kohya conv_dim); 0 = off."),
                io.Float.Input("conv_alpha", default=1.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="kohya conv_alpha; 0 = conv_rank (scale 1), as kohya reads it."),
                io.Float.Input("dropout", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="kohya network_dropout."),
                io.Float.Input("rank_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="kohya rank_dropout: chance that each rank of a module is left out for a "
                                       "step."),
                io.Float.Input("module_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="kohya module_dropout: chance that a whole module is left out for a step."),
                io.String.Input("network_args", default="", multiline=True, optional=True,
                                tooltip="kohya --network_args, key=value pairs, e.g. for SD3: context_attn_dim=16 "
                                        "x_mlp_dim=8 emb_dims=[0,0,0,0,0,0] train_block_indices=0-11 verbose=True. "
                                        "The Train node says which keys it reads."),
                io.Combo.Input("algorithm", options=list(ALGORITHMS), default="lora", optional=True,
                               tooltip="lora (LoCon with conv_rank), loha, lokr, dora (LoRA with weight decomposition). "
                                       "Files load as LyCORIS files (ComfyUI's Load LoRA, A1111, Forge). Needs "
                                       "lycoris-lora for all but lora."),
                io.Int.Input("factor", default=-1, min=-1, max=1024, optional=True,
                             tooltip="LoKr: Kronecker factor (LyCORIS factor); -1 = as square as possible."),
                io.Boolean.Input("full_matrix", default=False, optional=True,
                                 tooltip="LoKr: the large Kronecker half as a full matrix (no low rank; alpha unused)."),
            ],
            outputs=[KilnLoraConfigType.Output(display_name="lora_config")],
        )

    @classmethod
    def execute(cls, rank, alpha, conv_rank, conv_alpha, dropout, rank_dropout, module_dropout, network_args="",
                algorithm="lora", factor=-1, full_matrix=False) -> io.NodeOutput:
        parse_network_args(network_args)  # a typo is reported here, on this node
        config = LoraConfig(rank, alpha, conv_rank, conv_alpha, dropout, rank_dropout, module_dropout,
                            network_args.strip(), algorithm, factor, full_matrix)
        return io.NodeOutput(config.check())


def lora_output_path(name: str, node: str = "Save LoRA", what: str = "filename", kind: str = "loras") -> str:
    """``name`` inside ComfyUI's first models/loras folder (models/``kind``); names that would leave it, or hold
    control characters, are refused naming the input (``what``)."""
    root = os.path.realpath(folder_paths.get_folder_paths(kind)[0])
    check_text(name, node, what)
    clean = name.strip()
    if not clean:
        raise KilnError(f"{node}: {what} is empty; give a name such as 'kiln/my_{kind.rstrip('s')}'.")
    if not clean.endswith(".safetensors"):
        clean += ".safetensors"
    path = os.path.realpath(os.path.join(root, clean))
    if os.path.isabs(name.strip()) or os.path.commonpath([root, path]) != root:
        raise KilnError(f"{node}: {what} {name!r} points outside models/{kind} ({root}); use a plain name or a "
                        f"sub-folder such as 'kiln/my_{kind.rstrip('s')}'.")
    return path


def nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output_file(name: str, node: str, what: str, overwrite: bool = True, kind: str = "loras") -> str | None:
    """What is wrong with saving to ``name`` in models/``kind`` (for validation before anything runs), or None."""
    try:
        path = lora_output_path(name, node, what, kind)
    except KilnError as e:
        return str(e)
    folder = nearest_existing(os.path.dirname(path))
    if not os.access(folder, os.W_OK):
        return (f"{node}: cannot write into {folder} ({what} {name!r}): it is read-only or not yours. Give the user "
                f"running ComfyUI write access to it (e.g. chown -R that user {folder}), or make a folder you own "
                f"the first models/{kind} folder (extra_model_paths.yaml, is_default: true).")
    if not overwrite and os.path.exists(path):
        return f"{node}: {path} exists and overwrite is off; choose another name or turn overwrite on."
    return None


class KilnSaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnSaveLora",
            display_name="Save LoRA",
            category="Kiln",
            description="Writes a kohya-format .safetensors LoRA into models/loras (atomically).",
            inputs=[
                KilnLoraType.Input("lora", tooltip="The trained LoRA from a Train node."),
                io.String.Input("filename", default="kiln/my_lora", tooltip="Inside models/loras; sub-folders allowed."),
                io.Combo.Input("precision", options=list(DTYPES), default="fp16",
                               tooltip="dtype of the saved weights: fp16 (kohya's usual save_precision, half the "
                                       "size), bf16, or fp32 (as trained)."),
                io.Boolean.Input("overwrite", default=True, tooltip="Off: stop instead of replacing an existing file."),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        """Runs when the prompt is queued, before any training: a bad name fails now, not after the run. Only
        filename: ComfyUI reports a failure once per input this takes. An existing file with overwrite off, or a
        precision not among the choices (API prompts), is refused by the Train node before it trains
        (check_save_nodes), and by execute."""
        if filename is not None:
            return check_output_file(filename, "Save LoRA", "filename") or True
        return True

    @classmethod
    def execute(cls, lora: TrainedLora, filename, precision, overwrite) -> io.NodeOutput:
        check_options(cls, "Save LoRA", {"precision": precision})
        path = lora_output_path(filename)
        if os.path.exists(path) and not overwrite:
            raise KilnError(f"Save LoRA: {path} exists and overwrite is off; choose another name or turn overwrite on.")
        meta = dict(lora.metadata)
        meta["ss_output_name"] = os.path.splitext(os.path.basename(path))[0]
        save_lora_file(path, lora.to_dtype(precision), meta)
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved {path}"))
