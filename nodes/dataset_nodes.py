"""Load Dataset, Dataset from Images, Alpha/Mask Source (each with a preview of what trains) and Cache Latents."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import numpy as np
import torch
from PIL import Image

from comfy_api.latest import io, ui

import folder_paths

from ..trainer_core.data.cache import encode_dataset, refuse_uncacheable
from ..trainer_core.data.buckets import BucketConfig
from ..trainer_core.data.captions import CaptionOptions
from ..trainer_core.data.confine import allowed_roots, check_inside
from ..trainer_core.data.dataset import Subset, build_dataset, dataset_from_images, subsets_from_folder
from ..trainer_core.data.fingerprint import folders_fingerprint, subset_folders
from ..trainer_core.data.images import MemoryImage
from ..trainer_core.data.masks import INPUT_MASKS, MASK_MODES
from ..trainer_core.report.dataset_preview import preview_grid
from ..trainer_core.data.toml_config import load_dataset_toml
from ..trainer_core.errors import KilnError
from ..trainer_core.data.latent_store import DiskStore, MemoryStore
from .comfy.progress import Progress
from .comfy.vae import vae_encoder, vae_identity, vae_in_fp32
from .options import check_options
from . import tooltips as tips
from .types import KilnDataset, KilnDatasetType

log = logging.getLogger("kiln")


def confinement() -> list[str] | None:
    """The roots dataset paths must stay in (KILN_CONFINE_DATASETS / KILN_DATASET_ROOTS), or None: anywhere."""
    return allowed_roots(folder_paths.get_input_directory())


def check_subsets(subsets, what: str) -> None:
    """Under confinement, every image/caption folder and mask folder (and each entry in them) is allowed."""
    roots = confinement()
    for s in subsets:
        for d in (s.image_dir, s.mask_dir):
            if d:
                check_inside(d, roots, what)


def resolve_folder(path: str, what: str, allow_toml: bool = False) -> str:
    """Absolute paths as given; relative ones inside ComfyUI's input folder (confined there, and to the
    allowed roots, when the server confines dataset paths)."""
    path = path.strip()
    if not path:
        raise KilnError(f"{what}: no folder given. Enter the full path of your image folder.")
    full = path if os.path.isabs(path) else os.path.join(folder_paths.get_input_directory(), path)
    check_inside(full, confinement(), what)
    if allow_toml and full.lower().endswith(".toml"):
        if not os.path.isfile(full):
            raise KilnError(f"{what}: dataset config not found: {full}.")
        return full
    if not os.path.isdir(full):
        raise KilnError(f"{what}: folder not found: {full}. Enter the full path of an existing image folder "
                        f"(relative paths are read inside ComfyUI's input folder).")
    return full


def dataset_fingerprint(folder: str, regularization_folder: str = "") -> str:
    """Load Dataset's fingerprint: the TOML (if any), the top folders and every subset folder it reads."""
    root = resolve_folder(folder, "Load Dataset", allow_toml=True)
    if root.lower().endswith(".toml"):
        paths = [root] + subset_folders(load_dataset_toml(root)[0])
    else:
        paths = [root] + subset_folders(subsets_from_folder(root))
        if regularization_folder and regularization_folder.strip():
            reg = resolve_folder(regularization_folder, "Load Dataset (regularization)")
            paths += [reg] + subset_folders(subsets_from_folder(reg))
    return folders_fingerprint(paths)


def bucket_inputs() -> list:
    """resolution, batch size and kohya's bucket options (Load Dataset, Dataset from Images)."""
    return [
        io.Int.Input("resolution", default=512, min=64, max=4096, step=64, tooltip="Training area is resolution²."),
        io.Int.Input("batch_size", default=1, min=1, max=256,
                     tooltip="Images per training step (kohya train_batch_size); more needs more memory. With "
                             "buckets a batch holds images of one bucket."),
        io.Boolean.Input("enable_bucket", default=True, tooltip="Aspect-ratio bucketing (kohya)."),
        io.Int.Input("min_bucket_reso", default=256, min=16, max=4096, step=8,
                     tooltip="Shortest side a bucket may have (kohya min_bucket_reso)."),
        io.Int.Input("max_bucket_reso", default=1024, min=16, max=8192, step=8,
                     tooltip="Longest side a bucket may have (kohya max_bucket_reso)."),
        io.Int.Input("bucket_reso_steps", default=64, min=8, max=256, step=8,
                     tooltip="Bucket sides are multiples of this (kohya bucket_reso_steps; 64 is safe for every "
                             "family)."),
        io.Boolean.Input("bucket_no_upscale", default=False,
                         tooltip="Images smaller than resolution² keep their size in a bucket of their own "
                                 "instead of being scaled up (kohya bucket_no_upscale)."),
    ]


def augmentation_inputs() -> list:
    """kohya's caption augmentation and flip_aug, optional so existing API prompts keep working. Applied each time
    an image is drawn, to every subset (regularization included), as kohya does."""
    return [
        io.Boolean.Input("shuffle_caption", default=False, optional=True,
                         tooltip="Shuffle the comma-separated tags of each caption every time it is used."),
        io.Int.Input("keep_tokens", default=0, min=0, max=255, optional=True,
                     tooltip="The first N tags stay first and are never shuffled or dropped (e.g. 1 for a trigger word)."),
        io.String.Input("caption_prefix", default="", optional=True,
                        tooltip="Text put before every caption (joined with a space, as kohya). End it with ',' "
                                "to make it a tag of its own; with keep_tokens it can be the kept part."),
        io.String.Input("caption_suffix", default="", optional=True, tooltip="Text put after every caption."),
        io.Float.Input("caption_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="Chance that a caption is replaced by an empty one (unconditional training)."),
        io.Float.Input("caption_tag_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="Chance that each tag is left out; kept tags (keep_tokens) are never dropped."),
        io.Boolean.Input("flip_aug", default=False, optional=True,
                         tooltip="Also train on mirror images (kohya's flip_aug): Cache Latents encodes each image "
                                 "flipped too, and training picks one of the two at random each time."),
    ]


def preview_input() -> io.Int.Input:
    return io.Int.Input("preview_images", default=8, min=1, max=64, optional=True,
                        tooltip="How many of the first images the preview shows, cropped as they train, with their "
                                "mask (masked-out area darkened), bucket, repeats and caption.")


def preview_output() -> io.Image.Output:
    return io.Image.Output(display_name="preview", tooltip="The preview grid shown on the node, as an image.")


def bucket_config(resolution, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps,
                  bucket_no_upscale) -> BucketConfig:
    return BucketConfig((resolution, resolution), enable_bucket, min(min_bucket_reso, resolution),
                        max(max_bucket_reso, resolution), bucket_reso_steps, bucket_no_upscale)


def caption_options(shuffle_caption=False, keep_tokens=0, caption_prefix="", caption_suffix="",
                    caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0) -> CaptionOptions:
    return CaptionOptions(shuffle_caption=shuffle_caption, keep_tokens=keep_tokens,
                          caption_prefix=caption_prefix.strip(), caption_suffix=caption_suffix.strip(),
                          caption_dropout_rate=caption_dropout_rate, caption_tag_dropout_rate=caption_tag_dropout_rate)


def with_preview(cls, dataset, count: int, text: str, *outputs) -> io.NodeOutput:
    """The node's outputs followed by the preview IMAGE; the node shows the grid and ``text``."""
    grid = torch.from_numpy(np.asarray(preview_grid(dataset, count), dtype=np.float32) / 255.0)[None]
    shown = {**ui.PreviewImage(grid, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}
    return io.NodeOutput(*outputs, grid, ui=shown)


class KilnLoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnLoadDataset",
            display_name="Load Dataset",
            category="Kiln",
            description="A kohya-style image folder: 'N_name' sub-folders repeat N times with class token 'name'; "
                        "captions are the .txt files beside the images.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Image folder, or a kohya dataset .toml (absolute, or relative to "
                                "ComfyUI's input folder). A .toml brings its own repeats, captions, caption augmentation, "
                                "resolution, buckets and batch size; the widgets below are then not used."),
                io.String.Input("caption_extension", default=".txt",
                                tooltip="The caption file beside each image: image.png -> image.txt (kohya "
                                        "caption_extension; .caption is the other common one)."),
                io.String.Input("class_tokens", default="", tooltip="Caption for images without one. Empty: the 'name' of the N_name folder."),
                io.Int.Input("repeats", default=1, min=1, max=10000, tooltip="Repeats for images directly in the folder (N_name folders carry their own)."),
                *bucket_inputs(),
                io.String.Input("regularization_folder", default="", optional=True,
                                tooltip="DreamBooth regularization images (N_name folders), optional."),
                *augmentation_inputs(),
                preview_input(),
            ],
            outputs=[KilnDatasetType.Output(display_name="dataset"), io.String.Output(display_name="summary"),
                     preview_output()],
        )

    @classmethod
    def fingerprint_inputs(cls, folder=None, regularization_folder="", caption_extension=".txt", **_):
        """What the folders hold (names, sizes, times): an edited caption or image re-runs this node and what
        follows on the next Queue. A folder arriving through a link is unknown here: always re-run then."""
        if folder is None:
            return float("nan")
        try:
            return dataset_fingerprint(folder, regularization_folder)
        except Exception as e:  # the node will report it; an error is never cached by ComfyUI
            return f"error: {e}"

    @classmethod
    def execute(cls, folder, caption_extension, class_tokens, repeats, resolution, batch_size, enable_bucket,
                min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale, regularization_folder="",
                shuffle_caption=False, keep_tokens=0, caption_prefix="", caption_suffix="", caption_dropout_rate=0.0,
                caption_tag_dropout_rate=0.0, flip_aug=False, preview_images=8) -> io.NodeOutput:
        root = resolve_folder(folder, "Load Dataset", allow_toml=True)
        if root.lower().endswith(".toml"):
            subsets, buckets, batch_size = load_dataset_toml(root)
        else:
            subsets = subsets_from_folder(root, caption_extension, repeats, class_tokens, flip_aug=flip_aug)
            if not subsets:
                raise KilnError(f"Load Dataset: no images in {root}. Put images with .txt captions there, or in "
                                f"kohya-style 'N_name' sub-folders such as '10_mychar'.")
            if regularization_folder and regularization_folder.strip():
                reg_root = resolve_folder(regularization_folder, "Load Dataset (regularization)")
                subsets += subsets_from_folder(reg_root, caption_extension, 1, class_tokens, is_reg=True,
                                               flip_aug=flip_aug)
            buckets = bucket_config(resolution, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps,
                                    bucket_no_upscale)
            captions = caption_options(shuffle_caption, keep_tokens, caption_prefix, caption_suffix,
                                       caption_dropout_rate, caption_tag_dropout_rate)
            subsets = [dataclasses.replace(s, captions=captions) for s in subsets]
        check_subsets(subsets, "Load Dataset")
        dataset = build_dataset(subsets, buckets, batch_size)
        summary = dataset.summary()
        return with_preview(cls, dataset, preview_images, summary, KilnDataset(dataset), summary)


def _flat(value) -> list:
    """A list socket's value as one flat list (ComfyUI hands list inputs over as lists, possibly nested)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def _frames(values, rank: int, what: str) -> list[torch.Tensor]:
    """Single frames out of batches: IMAGE [B,H,W,C] (rank 3 per frame) or MASK [B,H,W] (rank 2)."""
    out = []
    for t in _flat(values):
        if not isinstance(t, torch.Tensor) or t.dim() not in (rank, rank + 1):
            raise KilnError(f"Dataset from Images: {what} must be ComfyUI {what.upper()} tensors, got "
                            f"{getattr(t, 'shape', type(t).__name__)}.")
        out.extend(t.unbind(0) if t.dim() == rank + 1 else [t])
    return out


def _bytes(t: torch.Tensor) -> np.ndarray:
    """[0,1] floats -> 8-bit, rounded (what a saved PNG of the same IMAGE holds, to rounding)."""
    return (t.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def memory_images(images, masks, notes: list[str]) -> list[MemoryImage]:
    """IMAGE frames (and MASK frames, one per image) as 8-bit in-memory images; a mask of another size is resized
    to its image (bilinear), with a note."""
    frames = _frames(images, 3, "images")
    mask_frames = _frames(masks, 2, "masks") if masks is not None else None
    if mask_frames is not None and len(mask_frames) != len(frames):
        raise KilnError(f"Dataset from Images: {len(frames)} images but {len(mask_frames)} masks; give one mask per "
                        f"image (a batch or a list of the same length), or disconnect masks.")
    out = []
    for k, frame in enumerate(frames):
        pixels = _bytes(frame)
        if pixels.shape[2] == 1:
            pixels = np.repeat(pixels, 3, axis=2)
        elif pixels.shape[2] not in (3, 4):
            raise KilnError(f"Dataset from Images: image {k} has {pixels.shape[2]} channels; expected RGB or RGBA.")
        mask = None
        if mask_frames is not None:
            mask = _bytes(mask_frames[k])
            if mask.shape != pixels.shape[:2]:
                notes.append(f"mask {k} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                             f"{pixels.shape[1]}x{pixels.shape[0]}; resized to match")
                mask = np.asarray(Image.fromarray(mask, "L").resize((pixels.shape[1], pixels.shape[0]),
                                                                      Image.Resampling.BILINEAR))
        out.append(MemoryImage.of(np.ascontiguousarray(pixels), mask))
    return out


def captions_for(captions, count: int) -> list[str]:
    """One caption per image from a STRING list of that length, or one string for all (none: all empty)."""
    values = [str(c) for c in _flat(captions)]
    if not values:
        return [""] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise KilnError(f"Dataset from Images: {count} images but {len(values)} captions; give one caption per image "
                        f"or a single caption for all of them.")
    return values


class KilnDatasetFromImages(io.ComfyNode):
    """Images, masks and captions built in the graph (folder loaders, segmentation nodes, captioners) as a
    KILN_DATASET; everything after it (Cache Latents, Train nodes) treats it as Load Dataset's."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnDatasetFromImages",
            display_name="Dataset from Images",
            category="Kiln",
            description="A dataset from IMAGE / MASK / STRING sockets, e.g. ComfyUI's Load Image-Text (from Folder) "
                        "with a mask from a segmentation node and captions from a captioner.",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="A batch, or a list of images of different sizes."),
                io.Int.Input("repeats", default=1, min=1, max=10000, tooltip="How often each image is seen per epoch."),
                io.String.Input("class_tokens", default="", tooltip="Caption for images whose caption is empty."),
                *bucket_inputs(),
                io.Mask.Input("masks", optional=True,
                              tooltip="One per image (white = train, black = ignored, grey = partial weight). Load "
                                      "Image's MASK is white where the image is transparent: invert it first."),
                io.String.Input("captions", optional=True, force_input=True,
                                tooltip="A STRING list with one caption per image (e.g. the texts of Load Image-Text "
                                        "(from Folder)), or one string for all. Empty captions: class_tokens."),
                *augmentation_inputs(),
                preview_input(),
            ],
            outputs=[KilnDatasetType.Output(display_name="dataset"), io.String.Output(display_name="summary"),
                     preview_output()],
        )

    @classmethod
    def execute(cls, images, repeats, class_tokens, resolution, batch_size, enable_bucket, min_bucket_reso,
                max_bucket_reso, bucket_reso_steps, bucket_no_upscale, masks=None, captions=None,
                **options) -> io.NodeOutput:
        one = {k: v[0] if isinstance(v, list) and v else v for k, v in dict(
            repeats=repeats, class_tokens=class_tokens, resolution=resolution, batch_size=batch_size,
            enable_bucket=enable_bucket, min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso,
            bucket_reso_steps=bucket_reso_steps, bucket_no_upscale=bucket_no_upscale, **options).items()}
        notes: list[str] = []
        pictures = memory_images(images, masks, notes)
        if not pictures:
            raise KilnError("Dataset from Images: no images arrived; connect an IMAGE batch or list.")
        preview_images = one.pop("preview_images", 8)
        flip_aug = one.pop("flip_aug", False)
        aug = {k: one.pop(k) for k in ("shuffle_caption", "keep_tokens", "caption_prefix", "caption_suffix",
                                        "caption_dropout_rate", "caption_tag_dropout_rate") if k in one}
        subset = Subset("Dataset from Images", one["repeats"], one["class_tokens"].strip(),
                        mask_mode=INPUT_MASKS if masks is not None else "none", captions=caption_options(**aug),
                        flip_aug=flip_aug, in_memory=True)
        buckets = bucket_config(one["resolution"], one["enable_bucket"], one["min_bucket_reso"],
                                one["max_bucket_reso"], one["bucket_reso_steps"], one["bucket_no_upscale"])
        dataset = dataset_from_images(pictures, captions_for(captions, len(pictures)), subset, buckets,
                                      one["batch_size"])
        dataset.report.extend(f"note: {n}" for n in notes)
        summary = dataset.summary() + ("\nmasks: from the masks input" if masks is not None else "")
        return with_preview(cls, dataset, preview_images, summary, KilnDataset(dataset), summary)


class KilnMaskSource(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnMaskSource",
            display_name="Alpha/Mask Source",
            category="Kiln",
            description="Masked loss: white trains, black is ignored, grey weighs in between.",
            inputs=[
                KilnDatasetType.Input("dataset", tooltip=tips.DATASET),
                io.Combo.Input("mode", options=list(MASK_MODES), default="alpha",
                               tooltip="alpha: the image's alpha channel; folder: a mask image with the same file name."),
                io.String.Input("mask_folder", default="", tooltip="For mode 'folder' (absolute, or relative to ComfyUI's input folder)."),
                io.Boolean.Input("missing_mask_is_white", default=False,
                                 tooltip="folder mode: train the whole image when its mask is missing, instead of "
                                         "stopping. (alpha mode: an image without an alpha channel always trains "
                                         "whole, as in kohya, with a warning per subset.)"),
                io.Int.Input("dilation", default=0, min=0, max=16,
                             tooltip="Grow masks by this many latent pixels (8 image pixels each) to keep fine edges."),
                preview_input(),
            ],
            outputs=[KilnDatasetType.Output(display_name="dataset"), preview_output()],
        )

    @classmethod
    def fingerprint_inputs(cls, mode=None, mask_folder=None, **_):
        """The mask folder's names, sizes and times: a replaced mask re-runs this node on the next Queue."""
        if mode != "folder":
            return mode
        if mask_folder is None:
            return float("nan")
        try:
            return folders_fingerprint([resolve_folder(mask_folder, "Alpha/Mask Source")])
        except Exception as e:
            return f"error: {e}"

    @classmethod
    def execute(cls, dataset: KilnDataset, mode, mask_folder, missing_mask_is_white, dilation=0,
                preview_images=8) -> io.NodeOutput:
        check_options(cls, "Alpha/Mask Source", {"mode": mode})
        dataset.dataset.check_mask_source(mode)
        mask_dir = resolve_folder(mask_folder, "Alpha/Mask Source") if mode == "folder" else None
        masked = dataset.dataset.with_masks(mode, mask_dir, missing_mask_is_white, dilation)
        notes = masked.report[len(dataset.dataset.report):]  # e.g. images without alpha in alpha mode
        text = "\n".join(f"note: {n}" for n in notes) or f"masks: {mode}"
        return with_preview(cls, masked, preview_images, text, dataset.replace(dataset=masked, cache=None))


# Latents already encoded in this ComfyUI process (shared by every Cache Latents node; least recently
# used entries beyond 2 GiB are dropped). Keys cover image bytes, mask, geometry and VAE: never stale.
MEMORY = MemoryStore(max_bytes=2 << 30)
LOG_EVERY_S = 5.0


def default_cache_folder(kind: str = "latents") -> str:
    """ComfyUI's user folder, as a system user ('__' prefix) the HTTP API does not serve; not temp/,
    which ComfyUI empties at every start. ``kind``: "latents" (Cache Latents) or "text" (encoder outputs)."""
    system_dir = getattr(folder_paths, "get_system_user_directory", None)
    base = system_dir("kiln_cache") if system_dir else os.path.join(folder_paths.get_user_directory(), "__kiln_cache")
    return os.path.join(base, kind)


def resolve_cache_folder(path: str) -> str:
    """Empty: the default; absolute as given; relative: inside ComfyUI's user folder."""
    path = (path or "").strip()
    if not path:
        return default_cache_folder()
    return path if os.path.isabs(path) else os.path.join(folder_paths.get_user_directory(), path)


class KilnCacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnCacheLatents",
            display_name="Cache Latents",
            category="Kiln",
            description="Encodes every image (and mask) once with the VAE, so training never runs the VAE. "
                        "Latents are reused from memory, and from disk with disk_cache on, whenever the image, "
                        "mask, crop, flip and VAE are the same.",
            inputs=[
                KilnDatasetType.Input("dataset", tooltip=tips.DATASET),
                io.Vae.Input("vae", tooltip="The VAE the model was trained with (Load Checkpoint's)."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per VAE call."),
                io.Boolean.Input("disk_cache", default=False, optional=True,
                                 tooltip="Keep latents on disk too, so later runs (even after a restart) skip the VAE. "
                                         "Entries are keyed by image and mask content, crop, flip and VAE: an edited "
                                         "image re-encodes alone, a stale latent is never used."),
                io.String.Input("cache_folder", default="", optional=True,
                                tooltip="Where the disk cache lives. Empty: ComfyUI's user/__kiln_cache/latents. "
                                        "Relative paths are inside ComfyUI's user folder. Safe to delete any time."),
                io.Boolean.Input("no_half_vae", default=False, optional=True,
                                 tooltip="Encode with the VAE in fp32 even when it was loaded in fp16/bf16 (kohya's "
                                         "no_half_vae: the SDXL VAE overflows in fp16). The VAE is put back as it was."),
            ],
            outputs=[KilnDatasetType.Output(display_name="dataset")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, dataset: KilnDataset, vae, batch_size, disk_cache=False, cache_folder="",
                no_half_vae=False) -> io.NodeOutput:
        refuse_uncacheable(dataset.dataset, "Cache Latents")
        disk = DiskStore(resolve_cache_folder(cache_folder)) if disk_cache else None
        progress = Progress(len(dataset.dataset.items), cls.hidden.unique_id)
        last_log = [0.0]

        def report(done: int, total: int, text: str) -> None:
            progress.update(done, total=total)
            progress.text(text)
            now = time.monotonic()
            if done == total or now - last_log[0] >= LOG_EVERY_S:
                last_log[0] = now
                log.info("Cache Latents: %s", text)

        notes: list[str] = []
        with vae_in_fp32(vae, notes) if no_half_vae else contextlib.nullcontext(vae) as encoding:
            cache = encode_dataset(dataset.dataset, vae_encoder(encoding), vae_identity(encoding), batch_size,
                                   report, memory=MEMORY, disk=disk)
        if cache.stats.encoded == 0:  # everything was reused: the bar still ends full
            progress.update(progress.total)
        summary = cache.stats.summary() + (f"\ndisk cache: {disk.folder}" if disk else "")
        summary += "".join(f"\nnote: {n}" for n in notes)
        log.info("Cache Latents: %s", summary.replace("\n", "; "))
        return io.NodeOutput(dataset.replace(cache=cache, vae=vae), ui=ui.PreviewText(summary))
