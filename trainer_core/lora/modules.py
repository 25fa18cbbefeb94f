"""A LoRA adapter that wraps one frozen Linear or Conv2d (peft's layer, kohya's forward override).

The adapter replaces the base module's ``forward`` attribute instead of the module itself, so module
names, state-dict keys and the host's own weight patching stay untouched; ``detach()`` undoes it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class LoRAModule(nn.Module):
    """y = base(x) + up(down(dropout(x))) * alpha / rank."""

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.name = name
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            k, s, p = base.kernel_size, base.stride, base.padding
            self.lora_down = nn.Conv2d(base.in_channels, self.rank, k, s, p, bias=False)
            self.lora_up = nn.Conv2d(self.rank, base.out_channels, 1, 1, bias=False)
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, base.out_features, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d, not {type(base).__name__} ({name})")
        # kohya / peft init: down ~ kaiming, up = 0, so training starts from the base model exactly.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)
        self.enabled = True
        self._base = [base]  # a list keeps the base out of this module's parameters and state dict
        self._base_forward = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def attach(self) -> None:
        if self._base_forward is not None:
            return
        self._base_forward = self.base.forward
        self.base.forward = self.forward

    def detach(self) -> None:
        if self._base_forward is None:
            return
        # the bound method was stored as an instance attribute; deleting it restores the class one
        if self.base.__dict__.get("forward") is not None:
            del self.base.__dict__["forward"]
        self._base_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if not self.enabled:
            return out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        h = x.to(self.lora_down.weight.dtype) if not torch.is_autocast_enabled() else x
        if self.training and self.dropout:
            h = F.dropout(h, self.dropout)
        h = self.lora_down(h)
        scale = self.scale
        if self.training and self.rank_dropout:
            # one keep-mask per sample and rank (kohya's rank_dropout)
            shape = (h.shape[0], self.rank, 1, 1) if self.is_conv else (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
            keep = (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            h = h * keep
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected magnitude (kohya does too)
        return out + (self.lora_up(h) * scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense weight change this adapter adds (used by tests and merging)."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if self.is_conv:
            d = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        else:
            d = up @ down
        return d * self.scale
