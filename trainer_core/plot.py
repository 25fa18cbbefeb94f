"""A loss curve drawn with Pillow (raw loss faint, moving average bold), for the IMAGE output."""
from __future__ import annotations

from PIL import Image, ImageDraw


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_plot(losses: list[float], width: int = 512, height: int = 256, title: str = "loss",
              validation=()) -> Image.Image:
    """``validation``: (step, loss) pairs, drawn as green dots on the same scale."""
    im = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(im)
    pad_l, pad_r, pad_t, pad_b = 48, 12, 22, 20
    d.text((pad_l, 4), f"{title}  steps={len(losses)}" + (f"  last={losses[-1]:.4f}" if losses else ""), fill=(220, 220, 220))
    if len(losses) < 2:
        return im
    lo, hi = min(losses + [v for _, v in validation]), max(losses + [v for _, v in validation])
    hi = hi if hi > lo else lo + 1e-8
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def xy(i, v):
        return pad_l + w * i / (len(losses) - 1), pad_t + h * (1 - (v - lo) / (hi - lo))
    d.rectangle([pad_l, pad_t, pad_l + w, pad_t + h], outline=(80, 80, 90))
    d.text((4, pad_t - 6), f"{hi:.3g}", fill=(160, 160, 160))
    d.text((4, pad_t + h - 6), f"{lo:.3g}", fill=(160, 160, 160))
    d.line([xy(i, v) for i, v in enumerate(losses)], fill=(90, 110, 160), width=1)
    avg = moving_average(losses, max(1, len(losses) // 20))
    d.line([xy(i, v) for i, v in enumerate(avg)], fill=(255, 170, 60), width=2)
    for step, v in validation:
        x, y = xy(step - 1, v)
        d.rectangle([x - 2, y - 2, x + 2, y + 2], fill=(90, 210, 122))
    return im
