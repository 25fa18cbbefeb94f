"""Optimizers (torch, or maintained libraries when installed) and learning-rate schedules."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .errors import KilnError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy", "AdamWScheduleFree", "SGD")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


def _need(module: str, pip_name: str, optimizer: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise KilnError(f"optimizer {optimizer} needs the '{pip_name}' package: pip install {pip_name} "
                        f"(in ComfyUI's Python), or pick AdamW.") from e


def build_optimizer(name: str, params: Iterable, lr: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    params = list(params)
    if name == "AdamW":  # fused: one kernel for all LoRA tensors instead of a Python loop over them
        tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
        fused = all(t.device.type in ("cuda", "cpu") and t.dtype == torch.float32 for t in tensors)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "AdamW8bit":
        bnb = _need("bitsandbytes", "bitsandbytes", name)
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "Prodigy":
        prodigyopt = _need("prodigyopt", "prodigyopt", name)
        return prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "AdamWScheduleFree":
        schedulefree = _need("schedulefree", "schedulefree", name)
        return schedulefree.AdamWScheduleFree(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise KilnError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def lr_lambda(kind: str, total_steps: int, warmup_steps: int = 0):
    """Multiplier of the base learning rate at a given step."""
    if kind not in SCHEDULERS:
        raise KilnError(f"unknown lr scheduler {kind!r}; use one of {SCHEDULERS}")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps and kind != "constant":
            return (step + 1) / warmup_steps
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress
    return f


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total_steps, warmup_steps))
