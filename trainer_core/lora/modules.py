"""Adapters that wrap one frozen Linear or Conv2d (peft's layer, kohya's forward override).

An adapter replaces the base module's ``forward`` attribute instead of the module itself, so module
names, state-dict keys and the host's own weight patching stay untouched; ``detach()`` undoes it.
``Adapter`` holds what every algorithm shares (attach/detach, module dropout, the base layer's shape and
conv arguments); ``LoRAModule`` is plain LoRA (LoCon on convs). LyCORIS algorithms live in ``lycoris.py``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class Adapter(nn.Module):
    """y = base(x) + delta(x). Subclasses define ``delta``, ``delta_weight`` and their file keys."""

    algorithm = ""

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, module_dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"adapters support Linear and Conv2d, not {type(base).__name__} ({name})")
        self.name = name
        self.rank = int(rank)
        self.alpha = self.kohya_alpha(alpha, self.rank)
        self.module_dropout = float(module_dropout)
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            self.shape = (base.out_channels, base.in_channels // base.groups, *base.kernel_size)
            self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        else:
            self.shape = (base.out_features, base.in_features)
            self.conv_args = {}
        self.enabled = True
        self._base = [base]  # a list keeps the base out of this module's parameters and state dict
        self._base_forward = None

    @staticmethod
    def kohya_alpha(alpha: float, rank: int) -> float:
        """kohya (networks/lora.py) and LyCORIS read alpha 0 (or none) as alpha = rank, i.e. scale 1; a literal
        0 would scale every update, and so every gradient, to zero."""
        return float(alpha) if alpha else float(rank)

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

    def skipped(self) -> bool:
        """kohya's module_dropout: the whole adapter is left out of this step."""
        return not self.enabled or (self.training and self.module_dropout and bool(torch.rand(()) < self.module_dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self.skipped():
            return out
        return out + self.delta(self.compute_input(x)).to(out.dtype)

    def compute_input(self, x: torch.Tensor) -> torch.Tensor:
        """Under autocast the adapter's fp32 weights meet x in autocast's dtype; else x meets them in fp32."""
        dtype = next(self.parameters()).dtype
        return x if torch.is_autocast_enabled() else x.to(dtype)

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The base layer's op with a dense weight ``w`` (no bias): what a materialised delta goes through."""
        if self.is_conv:
            return F.conv2d(x, w.reshape(self.shape), **self.conv_args)
        return F.linear(x, w.reshape(self.shape))

    # --- per algorithm ---
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The dense change this adapter makes to the base weight (tests and merging)."""
        raise NotImplementedError

    def state_items(self) -> dict[str, torch.Tensor]:
        """Tensors under their kohya/LyCORIS key suffixes (``lora_down.weight``, ``hada_w1_a``, ``alpha``...)."""
        raise NotImplementedError

    def load_items(self, items: dict[str, torch.Tensor]) -> None:
        """Inverse of ``state_items``; the caller has checked that every key is present."""
        with torch.no_grad():
            for key, value in items.items():
                if key == "alpha":
                    continue
                target = self.param_for(key)
                if tuple(target.shape) != tuple(value.shape):
                    raise RuntimeError(f"{self.name}.{key} has shape {tuple(value.shape)} in the file, "
                                       f"{tuple(target.shape)} here")
                target.copy_(value)
        if "alpha" in items:
            self.alpha = self.kohya_alpha(float(items["alpha"]), self.rank)

    def param_for(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class LoRAModule(Adapter):
    """y = base(x) + up(dropout(down(x))) * alpha / rank, kohya's networks.lora: network_dropout drops elements of
    the rank activations (down's output), rank_dropout whole ranks per sample, module_dropout the whole adapter."""

    algorithm = "lora"

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__(name, base, rank, alpha, module_dropout)
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        if self.is_conv:
            k, s, p = base.kernel_size, base.stride, base.padding
            self.lora_down = nn.Conv2d(base.in_channels, self.rank, k, s, p, bias=False)
            self.lora_up = nn.Conv2d(self.rank, base.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, base.out_features, bias=False)
        # kohya / peft init: down ~ kaiming, up = 0, so training starts from the base model exactly.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(h)
        if self.training and self.dropout:  # kohya: on down's output (not the input), scaled by 1 / (1 - p)
            h = F.dropout(h, self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            # one keep-mask per sample and rank (kohya's rank_dropout)
            shape = (h.shape[0], self.rank, 1, 1) if self.is_conv else (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
            keep = (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            h = h * keep
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected magnitude (kohya does too)
        return self.lora_up(h) * scale

    def low_rank_weight(self) -> torch.Tensor:
        down, up = self.lora_down.weight, self.lora_up.weight
        if self.is_conv:
            return torch.einsum("or,rihw->oihw", up.flatten(1), down) * self.scale
        return up @ down * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.low_rank_weight()

    def state_items(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight,
                "alpha": torch.tensor(self.alpha)}

    def param_for(self, key: str) -> torch.Tensor:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}.get(key) \
            if key.startswith("lora_") else getattr(self, key)
