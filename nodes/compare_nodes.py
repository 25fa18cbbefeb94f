"""Compare LoRAs: one labelled grid of a run's intermediate LoRAs (rows: step) at several strengths (columns),
under the base model, each sampled as ComfyUI's Load LoRA + KSampler would, so picking the best step needs no
other tool. The step with the lowest validation loss, where the run measured one, is framed."""
from __future__ import annotations

import json
import os
import re

import comfy.samplers
import folder_paths
from comfy_api.latest import io, ui
from safetensors import safe_open

from ..trainer_core.errors import KilnError
from ..trainer_core.report.grid import labelled_grid
from ..trainer_core.lora.io import TrainedLora, load_lora_file
from .comfy import model as cmodel
from .comfy.preview import PreviewSpec, pil_to_image, sample_images, to_pil
from .comfy.progress import Progress
from .comfy.text import TextConditioning
from .lora_nodes import lora_output_path
from . import tooltips as tips
from .options import check_text
from .types import KilnLoraType

NODE = "Compare LoRAs"


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        raise KilnError(f"{NODE}: strengths {text!r}: write numbers separated by commas, e.g. 0.6, 0.8, 1.0.") from None
    if not values:
        raise KilnError(f"{NODE}: strengths is empty; give at least one, e.g. 1.0.")
    return values


def metadata_of(path: str) -> dict:
    """A LoRA file's metadata only (its tensors are read once, for the row that samples with them)."""
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def series(save_name: str) -> list[tuple[int, str, dict]]:
    """(step, file, metadata) of a run's intermediate LoRAs (kohya's NAME-stepNNNNNNNN and NAME-NNNNNN epoch
    files in models/loras), by step."""
    folder = os.path.dirname(lora_output_path(f"{save_name}-step00000001", NODE, "save_name"))
    stem = re.escape(os.path.basename(save_name.strip()))
    pattern = re.compile(rf"^{stem}-(step)?\d+\.safetensors$")
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if pattern.match(name):
            path = os.path.join(folder, name)
            meta = metadata_of(path)
            found.append((int(meta.get("ss_steps") or re.findall(r"\d+", name)[-1]), path, meta))
    return sorted(found)


def listed(text: str) -> list[tuple[int, str, dict]]:
    """(step, file, metadata) of LoRAs named one per line, in that order."""
    out = []
    for name in (line.strip() for line in text.splitlines()):
        if not name:
            continue
        path = folder_paths.get_full_path("loras", name) or folder_paths.get_full_path("loras", name + ".safetensors")
        if path is None:
            raise KilnError(f"{NODE}: loras: {name!r} is not a file in models/loras; give names as Load LoRA lists them.")
        meta = metadata_of(path)
        out.append((int(meta.get("ss_steps") or 0), path, meta))
    return out


def validation_by_step(metas: list[dict]) -> dict[int, float]:
    out: dict[int, float] = {}
    for meta in metas:
        for step, loss in json.loads(meta.get("kiln_validation_loss") or "[]"):
            out[int(step)] = float(loss)
    return out


class KilnCompareLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnCompareLoras", display_name=NODE, category="Kiln",
            description="Samples the base model and each intermediate LoRA of a run (save_name, as the Train node "
                        "saved them) and the final LoRA at each strength, with ComfyUI's own LoRA patching and "
                        "sampler, into one labelled grid: rows = step, columns = strength.",
            inputs=[io.Model.Input("model", tooltip="The base model the LoRAs were trained on."),
                    io.Clip.Input("clip", tooltip=tips.CLIP), io.Vae.Input("vae", tooltip=tips.VAE),
                    io.String.Input("save_name", default="kiln/checkpoint",
                                    tooltip="The Train node's save_name: its <save_name>-stepNNNNNNNN LoRAs in "
                                            "models/loras are the rows."),
                    io.String.Input("strengths", default="0.6, 0.8, 1.0",
                                    tooltip="LoRA strengths, comma-separated: one column each."),
                    io.String.Input("prompt", default="a kiln toy", multiline=True,
                                    tooltip="The prompt of every cell (same seed everywhere, so only the LoRA "
                                            "differs)."),
                    io.String.Input("negative", default="", multiline=True, tooltip=tips.SAMPLER["negative"]),
                    io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip=tips.SAMPLER["seed"]),
                    io.Int.Input("steps", default=20, min=1, max=200, tooltip=tips.SAMPLER["steps"]),
                    io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1, tooltip=tips.SAMPLER["cfg"]),
                    io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                                   tooltip=tips.SAMPLER["sampler_name"]),
                    io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                                   tooltip=tips.SAMPLER["scheduler"]),
                    io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip=tips.SAMPLER["width"]),
                    io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip=tips.SAMPLER["height"]),
                    KilnLoraType.Input("lora", optional=True,
                                       tooltip="The Train node's final LoRA: the last row (and the Train node runs "
                                               "first)."),
                    io.String.Input("loras", default="", multiline=True, optional=True,
                                    tooltip="Instead of save_name: LoRA names as Load LoRA lists them, one per line "
                                            "(rows in this order).")],
            outputs=[io.Image.Output(display_name="grid")],
            hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def execute(cls, model, clip, vae, save_name, strengths, prompt, negative, seed, steps, cfg, sampler_name,
                scheduler, width, height, lora: TrainedLora | None = None, loras: str = "") -> io.NodeOutput:
        check_text(save_name, NODE, "save_name")
        check_text(prompt, NODE, "prompt")
        values = parse_strengths(strengths)
        files = listed(loras) if (loras or "").strip() else series(save_name)
        if lora is not None and not (loras or "").strip():  # the series' last-step file is the final LoRA again
            final = int(lora.metadata.get("ss_steps") or 0)
            files = [f for f in files if f[0] != final]
        rows = [(step, os.path.basename(path), load_lora_file(path)[0], meta) for step, path, meta in files]
        if lora is not None:
            rows.append((int(lora.metadata.get("ss_steps") or 0), "final", lora.state_dict, lora.metadata))
        if not rows:
            raise KilnError(f"{NODE}: no LoRAs to compare: nothing named {save_name}-stepNNNNNNNN in models/loras and "
                            f"no lora input. Set the Train node's save_every_n_steps and the same save_name here.")
        spec = PreviewSpec(prompt, negative, width, height, seed, steps, cfg, sampler_name, scheduler)
        progress = Progress(1 + len(rows) * len(values), cls.hidden.unique_id)
        base = to_pil(sample_images(model, TextConditioning(clip), vae, [spec])[0])
        progress.update(1)  # no live previews: the frontend would keep showing them over the finished grid
        cells, labels = [[base] * len(values)], ["base"]
        for r, (step, name, sd, _) in enumerate(rows):
            row = []
            for c, strength in enumerate(values):
                m, cl = cmodel.apply_lora(model, clip, sd, strength)
                row.append(to_pil(sample_images(m, TextConditioning(cl), vae, [spec])[0]))
                progress.update(1 + r * len(values) + c + 1)
            cells.append(row)
            labels.append(f"final, step {step}" if name == "final" else
                          f"{os.path.splitext(name)[0]}, step {step}" if (loras or "").strip() else f"step {step}")
        val = validation_by_step([meta for *_, meta in rows])
        scored = [(val[step], k + 1) for k, (step, *_) in enumerate(rows) if step in val]
        marked = min(scored)[1] if scored else None
        if marked is not None:
            labels[marked] += " (lowest val loss)"
        grid = labelled_grid(cells, labels, [f"x{v:g}" for v in values], marked, "LoRA strength:")  # ASCII: the default font has no ×, →
        image = pil_to_image(grid)
        text = (f"{len(rows)} LoRAs × {len(values)} strengths + base"
                + (f"; lowest validation loss {min(scored)[0]:.4f} at {labels[marked]}" if marked else ""))
        shown = {**ui.PreviewImage(image, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}
        return io.NodeOutput(image, ui=shown)
