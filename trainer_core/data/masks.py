"""Loss masks from a mask folder (same file name, R channel) or from the image's alpha channel."""
from __future__ import annotations

import logging
import os

from PIL import Image

from ..errors import KilnError
from .images import IMAGE_EXTENSIONS, open_image, read_mask

log = logging.getLogger("kiln")

MASK_MODES = ("none", "alpha", "folder")   # what Alpha/Mask Source offers
INPUT_MASKS = "input"                      # masks handed over with in-memory images (Dataset from Images)


def find_mask_file(image_path: str, mask_dir: str) -> str | None:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        p = os.path.join(mask_dir, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def mask_file_for(image_path: str, mask_dir: str | None, missing_is_white: bool) -> str | None:
    """The mask file of an image in folder mode; None (all white) only when a missing mask is allowed."""
    path = find_mask_file(image_path, mask_dir or "")
    if path is None and not missing_is_white:
        raise KilnError(f"no mask for {os.path.basename(image_path)} in {mask_dir}: add a mask image with the "
                        f"same file name, or enable 'missing mask = all white' on Alpha/Mask Source.")
    return path


def load_mask(image_path: str, image: Image.Image, mode: str, mask_dir: str | None,
              missing_is_white: bool = False) -> Image.Image | None:
    """An 'L' mask the size of ``image`` (255 = train), or None when masks are off."""
    if mode == "none":
        return None
    if mode == "alpha":
        if image.mode == "RGBA":
            return image.getchannel("A")
        return Image.new("L", image.size, 255)  # kohya converts to RGBA: no alpha channel = fully opaque
    if mode == "folder":
        path = mask_file_for(image_path, mask_dir, missing_is_white)
        if path is None:
            return Image.new("L", image.size, 255)
        mask = read_mask(path)
        if mask.size != image.size:
            log.warning("kiln: mask %s is %sx%s but its image is %sx%s; resizing the mask to match",
                        path, *mask.size, *image.size)
            mask = mask.resize(image.size, Image.Resampling.BILINEAR)
        return mask
    raise KilnError(f"unknown mask mode {mode!r}; use one of {MASK_MODES}")


def image_and_mask(item, subset) -> tuple[Image.Image, Image.Image | None]:
    """An item's upright image (RGB or RGBA) and its loss mask ('L', 255 = train) or None: the one reader of a
    dataset's pixels, from a file or from memory (the latent cache and the dataset preview both use it)."""
    src = item.source
    if src is None:
        image = open_image(item.path)
        return image, load_mask(item.path, image, subset.mask_mode, subset.mask_dir, subset.missing_mask_is_white)
    image = src.image()
    if subset.mask_mode == INPUT_MASKS:
        return image, src.mask_image()
    if subset.mask_mode == "folder":
        raise KilnError(f"{item.path} has no file name to find a mask by in a mask folder; give its mask to the "
                        f"masks input of Dataset from Images instead.")
    return image, load_mask(item.path, image, subset.mask_mode, None)


def has_alpha(path: str) -> bool:
    """Whether the file carries transparency (header only)."""
    with Image.open(path) as im:
        return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def opaque_alpha_notes(subsets, items) -> list[str]:
    """One warning per alpha-mask subset holding images without an alpha channel: kohya trains them as fully
    opaque (the whole image), and so does Kiln, but the user probably meant masks there."""
    notes = []
    for k, s in enumerate(subsets):
        if s.mask_mode != "alpha":
            continue
        members = [i for i in items if i.subset == k]
        paths = [i.path for i in members]
        opaque = [i.path for i in members if not (i.source.has_alpha if i.source is not None else has_alpha(i.path))]
        if opaque:
            notes.append(f"{s.image_dir}: {len(opaque)} of {len(paths)} images have no alpha channel (e.g. "
                         f"{os.path.basename(opaque[0])}); with alpha masks they train as fully opaque, the whole "
                         f"image, as kohya reads them")
            log.warning("kiln: %s", notes[-1])
    return notes


def image_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


__all__ = ["MASK_MODES", "INPUT_MASKS", "image_and_mask", "find_mask_file", "mask_file_for", "load_mask", "has_alpha", "opaque_alpha_notes", "image_rgb",
           "open_image"]
