"""Per-sample diffusion loss with optional loss masks, and kohya's loss options.

Formulas follow kohya-ss/sd-scripts (library/train_util.py conditional_loss / get_huber_threshold_if_needed,
library/custom_train_functions.py): pseudo-Huber ``2c(√(d²+c²) − c)``, kohya's "smooth_l1" ``2(√(d²+c²) − c)``
(not torch's piecewise SmoothL1), and the per-sample SNR weightings applied after the mean.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import KilnError

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def elementwise(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2",
                huber_c: torch.Tensor | float | None = None) -> torch.Tensor:
    """Error per element; ``huber_c`` is a number or one threshold per sample (huber / smooth_l1 only)."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if kind in ("huber", "smooth_l1"):
        c = torch.as_tensor(0.1 if huber_c is None else huber_c, dtype=pred.dtype, device=pred.device)
        c = c.view(-1, *([1] * (pred.dim() - 1))) if c.dim() else c
        root = torch.sqrt((pred - target) ** 2 + c ** 2) - c
        return 2 * c * root if kind == "huber" else 2 * root
    raise ValueError(f"unknown loss type {kind!r}; use one of {LOSS_TYPES}")


def huber_threshold(schedule: str, c: float, scale: float, timesteps: torch.Tensor, num_timesteps: int = 1000,
                    alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """kohya's huber_c per sample: constant c·scale; exponential e^(−αt)·scale with α = −ln(c)/T (c at t = T);
    snr (1 − c)/(1 + σ_t)² + c with σ_t = √((1 − ᾱ_t)/ᾱ_t) (kohya applies no scale there)."""
    t = timesteps.detach().double().cpu()
    if schedule == "constant":
        out = torch.full_like(t, c * scale)
    elif schedule == "exponential":
        out = torch.exp(t * (math.log(c) / num_timesteps)) * scale
    elif schedule == "snr":
        if alphas_cumprod is None:
            raise KilnError("training_args huber_schedule=snr needs a DDPM noise schedule (SD1/SDXL), as in kohya; "
                            "use huber_schedule=constant or exponential for SD3.")
        acp = alphas_cumprod.double().cpu()[t.long()]
        sigma = ((1 - acp) / acp) ** 0.5
        out = (1 - c) / (1 + sigma) ** 2 + c
    else:
        raise KilnError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {schedule!r}.")
    return out.float()


def snr_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR/(SNR + 1) with SNR capped at 1000 (t = 0 would be infinite), as kohya's get_snr_scale."""
    s = snr.clamp(max=1000.0)
    return s / (s + 1)


def snr_loss_weight(snr: torch.Tensor, v_prediction: bool, scale_v_pred_loss_like_noise_pred: bool = False,
                    v_pred_like_loss: float = 0.0, debiased_estimation_loss: bool = False) -> torch.Tensor:
    """The per-sample multiplier of kohya's post-processing after min-SNR, in kohya's order:
    × SNR/(SNR+1); + loss/scale·v_pred_like_loss (= × (1 + v/scale)); × 1/√SNR (ε) or 1/(SNR+1) (v)."""
    w = torch.ones_like(snr)
    if scale_v_pred_loss_like_noise_pred:
        w = w * snr_scale(snr)
    if v_pred_like_loss:
        w = w * (1 + v_pred_like_loss / snr_scale(snr))
    if debiased_estimation_loss:
        s = snr.clamp(max=1000.0)
        w = w * (1 / (s + 1) if v_prediction else 1 / torch.sqrt(s))
    return w


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
