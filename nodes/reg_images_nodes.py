"""Make Regularization Images: kohya's class images, sampled in the graph from the MODEL/CLIP/VAE already loaded,
into a folder Load Dataset reads as its regularization_folder; a second run with the same model, prompt, count
and seeds generates nothing."""
from __future__ import annotations

import os
import re

import comfy.samplers
import folder_paths
import torch
from comfy_api.latest import io, ui
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..trainer_core.files.atomic import write_atomically
from ..trainer_core.data.confine import check_inside
from ..trainer_core.data.generated import caption_of, image_name, plan, read_manifest, write_manifest
from ..trainer_core.errors import KilnError
from .comfy.model import model_identity
from .comfy.preview import PreviewSpec, pil_to_image, sample_images, to_pil
from .comfy.progress import Progress
from .comfy.text import TextConditioning, clip_identity
from .comfy.vae import vae_identity
from .dataset_nodes import confinement
from . import tooltips as tips
from .options import check_text

NODE = "Make Regularization Images"


def class_folder(prompt: str, repeats: int) -> str:
    """kohya's ``N_name`` sub-folder: N repeats, the prompt as its (file-system safe) name."""
    name = re.sub(r"[^\w\- ]+", "", prompt).strip()[:48].strip() or "class"
    return f"{repeats}_{name}"


def output_folder(folder: str) -> str:
    check_text(folder, NODE, "folder")
    clean = folder.strip()
    if not clean or os.path.isabs(clean):
        raise KilnError(f"{NODE}: folder {folder!r} must be a name inside ComfyUI's input folder, e.g. kiln_reg/dog.")
    root = os.path.realpath(folder_paths.get_input_directory())
    full = os.path.realpath(os.path.join(root, clean))
    if os.path.commonpath([root, full]) != root:
        raise KilnError(f"{NODE}: folder {folder!r} points outside ComfyUI's input folder ({root}).")
    check_inside(full, confinement(), f"{NODE}: folder")
    return full


class KilnMakeRegImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnMakeRegImages", display_name=NODE, category="Kiln",
            description="Samples N class images (kohya's regularization images) with this MODEL/CLIP/VAE and "
                        "ComfyUI's sampler into input/<folder>/<repeats>_<prompt>/, each with its prompt as caption "
                        "and its seed recorded; connect 'regularization_folder' to Load Dataset. Images already "
                        "made with the same model, prompt, settings and seed are not made again.",
            inputs=[io.Model.Input("model", tooltip=tips.MODEL), io.Clip.Input("clip", tooltip=tips.CLIP),
                    io.Vae.Input("vae", tooltip=tips.VAE),
                    io.String.Input("prompt", default="a photo of a toy", multiline=True,
                                    tooltip="The class prompt (the class word without your trigger), also written "
                                            "as every image's caption."),
                    io.String.Input("negative", default="", multiline=True, tooltip=tips.SAMPLER["negative"]),
                    io.Int.Input("count", default=50, min=1, max=100_000,
                                 tooltip="kohya: about as many images as training images × repeats."),
                    io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip=tips.SAMPLER["width"]),
                    io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip=tips.SAMPLER["height"]),
                    io.Int.Input("steps", default=25, min=1, max=200, tooltip=tips.SAMPLER["steps"]),
                    io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1, tooltip=tips.SAMPLER["cfg"]),
                    io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                                   tooltip=tips.SAMPLER["sampler_name"]),
                    io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                                   tooltip=tips.SAMPLER["scheduler"]),
                    io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                                 tooltip="Image i is sampled with seed + i."),
                    io.String.Input("folder", default="kiln_reg",
                                    tooltip="Inside ComfyUI's input folder; the images go into a <repeats>_<prompt> "
                                            "sub-folder, as kohya's reg folders are laid out."),
                    io.Int.Input("repeats", default=1, min=1, max=10_000,
                                 tooltip="The repeats of the class folder (<repeats>_<prompt>), as kohya's reg "
                                         "folders carry them.")],
            outputs=[io.String.Output(display_name="regularization_folder",
                                      tooltip="Connect to Load Dataset's regularization_folder."),
                     io.Image.Output(display_name="images", tooltip="The first (up to 16) images.")],
            hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def execute(cls, model, clip, vae, prompt, negative, count, width, height, steps, cfg, sampler_name, scheduler,
                seed, folder, repeats) -> io.NodeOutput:
        check_text(prompt, NODE, "prompt")
        if not prompt.strip():
            raise KilnError(f"{NODE}: prompt is empty; give the class prompt, e.g. 'a photo of a dog'.")
        root = output_folder(folder)
        target = os.path.join(root, class_folder(prompt, repeats))
        os.makedirs(target, exist_ok=True)
        settings = {"model": model_identity(model), "clip": clip_identity(clip, "prompt"), "vae": vae_identity(vae),
                    "prompt": prompt, "negative": negative, "width": width, "height": height, "steps": steps,
                    "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler}
        todo, stale = plan(target, settings, count, seed)
        made = dict(read_manifest(target).get("images", {})) if len(todo) < count else {}
        for name in stale:
            for path in (os.path.join(target, name), os.path.join(target, caption_of(name))):
                if os.path.exists(path):
                    os.remove(path)
            made.pop(name, None)
        cond = TextConditioning(clip)
        progress = Progress(len(todo), cls.hidden.unique_id)
        for k, (name, image_seed) in enumerate(todo):
            spec = PreviewSpec(prompt, negative, width, height, image_seed, steps, cfg, sampler_name, scheduler)
            pil = to_pil(sample_images(model, cond, vae, [spec])[0])
            info = PngInfo()
            info.add_text("parameters", f"{prompt}\nNegative prompt: {negative}\nSteps: {steps}, Sampler: "
                          f"{sampler_name} {scheduler}, CFG scale: {cfg}, Seed: {image_seed}, Size: {width}x{height}")
            write_atomically(os.path.join(target, name), lambda tmp: pil.save(tmp, format="PNG", pnginfo=info),
                             f"{NODE}: image {name}", "Free disk space or choose another folder.")
            write_atomically(os.path.join(target, caption_of(name)), lambda tmp: _write_text(tmp, prompt),
                             f"{NODE}: caption of {name}", "Free disk space or choose another folder.")
            made[name] = image_seed
            write_manifest(target, settings, made)  # after each image: a Cancel keeps what was made
            progress.update(k + 1, pil)
        if not todo:
            write_manifest(target, settings, made)
        shown = torch.cat([_load(os.path.join(target, image_name(i))) for i in range(min(count, 16))])
        rel = os.path.relpath(root, folder_paths.get_input_directory())
        text = (f"{len(todo)} generated, {count - len(todo)} kept{f', {len(stale)} removed beyond count' if stale else ''}"
                f" (kept: made before with the same model, prompt, settings and seed): {target}")
        return io.NodeOutput(rel, shown, ui=ui.PreviewText(text))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _load(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        return pil_to_image(im)
