"""Reading images and masks robustly: EXIF orientation, odd modes, unreadable files named."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

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


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes: the content key of pixels that never were a file."""
    h = hashlib.sha256(f"{a.shape}|{a.dtype}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class MemoryImage:
    """An image handed over by the graph (an IMAGE socket) instead of a file: 8-bit pixels, HxWx3 (or HxWx4
    with alpha), and optionally its loss mask, HxW 8-bit at the image's size (255 = train). The digests stand
    in for a file's bytes in the latent cache's keys."""
    pixels: np.ndarray
    mask: np.ndarray | None = None
    digest: str = ""
    mask_digest: str | None = None

    @classmethod
    def of(cls, pixels: np.ndarray, mask: np.ndarray | None = None) -> "MemoryImage":
        return cls(pixels, mask, array_digest(pixels), None if mask is None else array_digest(mask))

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def has_alpha(self) -> bool:
        return self.pixels.shape[2] == 4

    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels, "RGBA" if self.has_alpha else "RGB")

    def mask_image(self) -> Image.Image | None:
        return None if self.mask is None else Image.fromarray(self.mask, "L")
