"""The dataset preview: the first N images as training sees them, their masks as an overlay, caption, bucket, repeats.

Each tile is the item's pixels after the very resize and crop the latent cache feeds to the VAE (the same
``image_and_mask`` / ``item_geometry`` / ``training_pixels`` calls), so a mask that is misaligned, inverted
or stretched in training looks exactly that wrong here. Masked-out area is darkened and tinted; white
(trained) area is shown unchanged.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from ..data.cache import item_geometry, training_pixels
from ..data.captions import base_caption
from ..data.dataset import Dataset
from ..data.masks import image_and_mask, image_rgb

KEEP = 0.3                           # brightness left in a fully masked-out pixel
TINT = torch.tensor([0.2, 0.0, 0.12])[:, None, None]  # added there, scaled by how much is masked out
CELL = 192                           # longest side of a tile in the grid
FONT = 18                            # large enough to read when the node shows the grid at ~40 %
TEXT_H = 2 * FONT + 12               # two lines of text under each tile
COLUMNS = 4
BACKGROUND = (24, 24, 28)


def overlay(pixels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """CHW pixels in [0,1] with the 1HW mask shown: m·px + (1−m)·(KEEP·px + TINT); no mask: the pixels."""
    if mask is None:
        return pixels
    return (mask * pixels + (1 - mask) * (KEEP * pixels + TINT)).clamp(0, 1)


def training_view(dataset: Dataset, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CHW pixels, 1HW mask or None) of item ``index`` at its bucket size, cropped as it trains (unflipped)."""
    item = dataset.items[index]
    image, mask = image_and_mask(item, dataset.subsets[item.subset])
    return training_pixels(image_rgb(image), mask, item_geometry(item))


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _cut(text: str, font, width: int) -> str:
    """``text`` cut (with '...') to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def preview_tile(dataset: Dataset, index: int) -> Image.Image:
    """One item's training view with its mask overlay, scaled to fit a CELL² box."""
    pixels, mask = training_view(dataset, index)
    shown = overlay(pixels, mask)
    im = Image.fromarray((shown.permute(1, 2, 0) * 255).round().byte().numpy(), "RGB")
    scale = CELL / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)


def preview_grid(dataset: Dataset, count: int = 8) -> Image.Image:
    """The first ``count`` items in a grid: each tile with 'W x H (its bucket), N repeats' and its caption (cut) below."""
    n = max(1, min(count, len(dataset.items)))
    cols = min(COLUMNS, n)
    rows = (n + cols - 1) // cols
    pad = 6
    grid = Image.new("RGB", (cols * (CELL + pad) + pad, rows * (CELL + TEXT_H + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font(FONT)
    for k in range(n):
        item = dataset.items[k]
        subset = dataset.subsets[item.subset]
        x0 = pad + (k % cols) * (CELL + pad)
        y0 = pad + (k // cols) * (CELL + TEXT_H + pad)
        tile = preview_tile(dataset, k)
        grid.paste(tile, (x0 + (CELL - tile.width) // 2, y0 + (CELL - tile.height) // 2))
        n = subset.num_repeats
        info = f"{item.bucket[0]}x{item.bucket[1]}, {n} repeat{'s' if n != 1 else ''}" + (" (reg)" if subset.is_reg else "")
        draw.text((x0, y0 + CELL + 3), _cut(info, font, CELL), fill=(200, 200, 200), font=font)
        draw.text((x0, y0 + CELL + FONT + 7), _cut(base_caption(item.caption, subset.captions) or "(no caption)", font, CELL), fill=(235, 235, 235),
                  font=font)
    return grid
