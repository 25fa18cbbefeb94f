"""A labelled image grid (Compare LoRAs): rows and columns with their labels drawn into the image, so the grid
says what it shows wherever it is saved or shared."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                  marked_row: int | None = None, corner: str = "") -> Image.Image:
    """``cells[r][c]`` (all one size) under column labels, beside row labels; ``marked_row`` gets a frame (e.g.
    the step with the lowest validation loss)."""
    w, h = cells[0][0].size
    size = max(12, min(24, h // 8))
    f = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(int(probe.textlength(t, font=f)) for t in row_labels + [corner]) + 12
    top = size + 12
    cols = max(len(r) for r in cells)
    grid = Image.new("RGB", (left + cols * w, top + len(cells) * h), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    draw.text((6, 4), corner, fill=(160, 160, 160), font=f)
    for c, label in enumerate(col_labels):
        x = left + c * w + (w - draw.textlength(label, font=f)) / 2
        draw.text((x, 4), label, fill=(235, 235, 235), font=f)
    for r, row in enumerate(cells):
        y = top + r * h
        colour = (255, 210, 60) if r == marked_row else (235, 235, 235)
        draw.text((6, y + (h - size) / 2), row_labels[r], fill=colour, font=f)
        for c, cell in enumerate(row):
            grid.paste(cell.convert("RGB"), (left + c * w, y))
        if r == marked_row:
            draw.rectangle([left, y, left + len(row) * w - 1, y + h - 1], outline=colour, width=max(2, size // 6))
    return grid
