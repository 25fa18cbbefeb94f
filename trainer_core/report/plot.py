"""The Train nodes' ``loss_plot`` IMAGE, drawn with Pillow: raw loss faint under its moving average, the learning
rate on a second (right) axis, validation loss as dots, intermediate saves as marked dashed lines, ticked axes.
js/kiln.js draws the live chart with the same layout and colours, so the two read alike."""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# RGB; the same values as js/kiln.js
COLOURS = {"background": (24, 24, 28), "frame": (80, 80, 90), "grid": (44, 44, 52), "text": (220, 220, 220),
           "label": (170, 170, 170), "raw": (90, 110, 160), "smooth": (255, 170, 60), "lr": (200, 110, 230),
           "val": (90, 210, 122), "save": (110, 200, 220)}
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 52, 60, 30, 26  # room for the loss, lr and step tick labels


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """1/20 of the steps, at least 3 so a short run's curve is smoothed too, at most a quarter of them."""
    return max(1, min(n // 4, max(3, n // 20)))


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """At most ``count``+1 tick values inside [lo, hi], spaced 1, 2 or 5 × 10^k (the usual chart rule)."""
    span = hi - lo
    if not span > 0:
        return [lo]
    base = 10 ** math.floor(math.log10(span / count))
    step = next(base * m for m in (1, 2, 5, 10) if span / (base * m) <= count)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]


@dataclass
class Frame:
    """Where data lands in the image (whole pixels): steps along x, loss on the left axis, learning rate (from 0) on
    the right."""
    width: int
    height: int
    steps: tuple[float, float]
    loss: tuple[float, float]
    lr_max: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return PAD_LEFT, PAD_TOP, self.width - PAD_RIGHT, self.height - PAD_BOTTOM

    def x(self, step: float) -> int:
        left, _, right, _ = self.box
        return round(left + (right - left) * (step - self.steps[0]) / (self.steps[1] - self.steps[0]))

    def y_loss(self, v: float) -> int:
        _, top, _, bottom = self.box
        return round(bottom - (bottom - top) * (v - self.loss[0]) / (self.loss[1] - self.loss[0]))

    def y_lr(self, v: float) -> int:
        _, top, _, bottom = self.box
        return round(bottom - (bottom - top) * v / self.lr_max)


def frame_for(losses: list[float], width: int, height: int, validation=(), lrs=()) -> Frame:
    values = list(losses) + [v for _, v in validation]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    margin = 0.04 * (hi - lo)  # no line hides in the frame's edge
    lr_max = max((v for _, v in lrs if math.isfinite(v)), default=0.0)
    return Frame(width, height, (1, max(2, len(losses))), (lo - margin, hi + margin), lr_max * 1.08)


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fmt_lr(v: float) -> str:
    return "0" if v == 0 else f"{v:.0e}" if f"{v:.1e}"[2] == "0" else f"{v:.1e}"


def loss_plot(losses: list[float], width: int = 640, height: int = 320, title: str = "loss", validation=(),
              lrs=(), saves=()) -> Image.Image:
    """``losses`` per step from 1; ``validation``: (step, loss) pairs; ``lrs``: (step, learning rate) pairs;
    ``saves``: the steps after which an intermediate file was written (TrainResult carries all four)."""
    c = COLOURS
    im = Image.new("RGB", (width, height), c["background"])
    d = ImageDraw.Draw(im)
    font, small = _font(13), _font(11)
    head = f"{title}  step {len(losses)}" + (f"  loss {losses[-1]:.4f}" if losses else "")
    if validation:
        head += f"  val {validation[-1][1]:.4f}"
    if lrs:
        head += f"  lr {_fmt_lr(lrs[-1][1])}"
    d.text((PAD_LEFT, 3), head, fill=c["text"], font=font)
    if not losses:
        return im
    f = frame_for(losses, width, height, validation, lrs)
    left, top, right, bottom = f.box
    # legend, right-aligned on the title line
    items = [("raw", "raw"), ("smoothed", "smooth")] + ([("lr", "lr")] if f.lr_max > 0 else []) + \
            ([("val", "val")] if validation else []) + ([("save", "save")] if saves else [])
    lx = width - 6
    for label, key in reversed(items):
        lx -= d.textlength(label, font=small) + 4
        d.text((lx, 5), label, fill=c[key], font=small)
        lx -= 14
        d.line([(lx, 12), (lx + 10, 12)], fill=c[key], width=3)
        lx -= 6
    # grid and ticks
    for t in nice_ticks(*f.loss):
        y = f.y_loss(t)
        d.line([(left, y), (right, y)], fill=c["grid"])
        d.line([(left - 4, y), (left, y)], fill=c["frame"])
        d.text((left - 6, y), f"{t:.3g}", fill=c["label"], font=small, anchor="rm")
    for t in nice_ticks(*f.steps, count=6):
        x = f.x(t)
        d.line([(x, top), (x, bottom)], fill=c["grid"])
        d.line([(x, bottom), (x, bottom + 4)], fill=c["frame"])
        d.text((x, bottom + 6), f"{t:g}", fill=c["label"], font=small, anchor="mt")
    if f.lr_max > 0:
        for t in nice_ticks(0, f.lr_max, count=4):
            y = f.y_lr(t)
            d.line([(right, y), (right + 4, y)], fill=c["lr"])
            d.text((right + 6, min(y, bottom - 6)), _fmt_lr(t), fill=c["lr"], font=small, anchor="lm")
    d.rectangle([left, top, right, bottom], outline=c["frame"])
    # saves: a dashed line through the plot and a marker above it
    for s in saves:
        x = f.x(s)
        for y in range(top + 1, bottom, 6):
            d.line([(x, y), (x, min(y + 2, bottom - 1))], fill=c["save"])
        d.polygon([(x - 4, top - 7), (x + 4, top - 7), (x, top - 1)], fill=c["save"])
    steps = range(1, len(losses) + 1)
    if len(losses) > 1:
        d.line([(f.x(s), f.y_loss(v)) for s, v in zip(steps, losses)], fill=c["raw"], width=1)
        avg = moving_average(losses, smoothing_window(len(losses)))
        d.line([(f.x(s), f.y_loss(v)) for s, v in zip(steps, avg)], fill=c["smooth"], width=2)
    if f.lr_max > 0:
        pts = [(f.x(s), f.y_lr(v)) for s, v in lrs if math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=c["lr"], width=1)
    for s, v in validation:
        x, y = f.x(s), f.y_loss(v)
        d.rectangle([x - 3, y - 3, x + 3, y + 3], fill=c["val"])
    return im
