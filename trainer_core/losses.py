"""Per-sample diffusion loss with optional loss masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


def elementwise(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.1) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if kind == "huber":  # kohya's pseudo-Huber
        return 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=huber_c)
    raise ValueError(f"unknown loss type {kind!r}; use one of {LOSS_TYPES}")


def per_sample_loss(err: torch.Tensor, mask: torch.Tensor | None = None, normalize_by_area: bool = False) -> torch.Tensor:
    """Mean error per sample; a mask weights every latent pixel (0 = ignored).

    Without normalisation a small masked subject contributes little (kohya's behaviour); with it the
    loss is the mean over the masked area only, so every sample weighs the same.
    """
    if mask is None:
        return err.mean(dim=tuple(range(1, err.dim())))
    m = mask.to(err.dtype).expand_as(err)
    dims = tuple(range(1, err.dim()))
    if normalize_by_area:
        return (err * m).sum(dims) / m.sum(dims).clamp_min(1e-6)
    return (err * m).mean(dims)
