"""Reading images and masks robustly: EXIF orientation, odd modes, unreadable files named."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import KilnError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def open_image(path: str) -> Image.Image:
    """The image upright (EXIF), as RGB or RGBA (alpha kept when the file has transparency)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise KilnError(f"cannot read image {path}: {e}. Re-export it as PNG/JPEG or remove it from the dataset.") from e
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (PIL opens some 16-bit PNGs as "I"): the format's range 0..65535 maps onto 0..255
        # (÷ 257, rounded), never the image's own maximum, so a half-bright picture stays half bright
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    return im.convert("RGBA" if has_alpha else "RGB")


def read_mask(path: str) -> Image.Image:
    """A mask image's R channel as 8-bit greyscale (white = train, black = ignore)."""
    im = open_image(path)
    return im.getchannel("R")


def check_dir(path: str, what: str) -> str:
    if not path or not os.path.isdir(path):
        raise KilnError(f"{what} folder not found: {path!r}. Give the full path of an existing folder.")
    return path
