"""A set of LoRA adapters over one host network, keyed by their kohya names."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .modules import LoRAModule
from .targets import TargetRule, select_targets


class LoRANetwork(nn.Module):
    """All adapters of one training run. ``name_of(path)`` turns a host module path into a kohya
    name (e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``)."""

    def __init__(self, root: nn.Module, rules: list[TargetRule], name_of: Callable[[str], str],
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.init = torch.Generator().manual_seed(seed)  # the same seed gives the same starting adapters
        self.dropouts = (dropout, rank_dropout, module_dropout)
        self.adapters = nn.ModuleDict()
        self.paths: dict[str, str] = {}  # kohya name -> host module path
        self.groups: dict[str, str] = {}  # kohya name -> "unet" or a text encoder (own learning rate)
        self.add(root, rules, name_of, "unet")

    def add(self, root: nn.Module, rules: list[TargetRule], name_of: Callable[[str], str], group: str) -> int:
        """Adapters on a second host network (a text encoder); returns how many were added."""
        before = len(self.adapters)
        for path, module, rank, alpha in select_targets(root, rules):
            name = name_of(path)
            if name in self.adapters:
                raise RuntimeError(f"two modules map to the LoRA name {name}")
            self.adapters[name] = LoRAModule(name, module, rank, alpha, *self.dropouts, self.init)
            self.paths[name] = path
            self.groups[name] = group
        return len(self.adapters) - before

    def param_groups(self, lr: float, group_lrs: dict[str, float]) -> list[dict]:
        """Optimizer parameter groups, one per adapter group, each at its own learning rate."""
        groups: dict[str, list] = {}
        for name, a in self.adapters.items():
            groups.setdefault(self.groups[name], []).extend(p for p in a.parameters() if p.requires_grad)
        return [{"params": ps, "lr": group_lrs.get(g, lr), "name": g} for g, ps in groups.items()]

    def __len__(self):
        return len(self.adapters)

    def attach(self) -> None:
        for a in self.adapters.values():
            a.attach()

    def detach(self) -> None:
        for a in self.adapters.values():
            a.detach()

    @contextlib.contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def set_enabled(self, on: bool) -> None:
        for a in self.adapters.values():
            a.enabled = on

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha`` per adapter (copies: a
        snapshot taken mid-training must not follow the live weights)."""
        sd = {}
        for name, a in self.adapters.items():
            sd[f"{name}.lora_down.weight"] = a.lora_down.weight.detach().to("cpu", dtype, copy=True).contiguous()
            sd[f"{name}.lora_up.weight"] = a.lora_up.weight.detach().to("cpu", dtype, copy=True).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(a.alpha, dtype=dtype)
        return sd

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Resume from a saved file: every adapter must be present with the same rank."""
        missing = [n for n in self.adapters if f"{n}.lora_down.weight" not in sd]
        if missing:
            raise KeyError(f"{len(missing)} LoRA modules missing from the file, e.g. {missing[0]}")
        for name, a in self.adapters.items():
            for part in ("lora_down", "lora_up"):
                have, want = sd[f"{name}.{part}.weight"].shape, getattr(a, part).weight.shape
                if have != want:  # copy_ would broadcast a rank-1 file into every row of a rank-4 adapter
                    rank_of = (lambda s: s[0]) if part == "lora_down" else (lambda s: s[1])
                    raise ValueError(f"{name}: the file has rank {rank_of(have)} ({part} {tuple(have)}), this "
                                     f"LoRA rank {rank_of(want)} ({tuple(want)})")
        for name, a in self.adapters.items():
            with torch.no_grad():
                a.lora_down.weight.copy_(sd[f"{name}.lora_down.weight"])
                a.lora_up.weight.copy_(sd[f"{name}.lora_up.weight"])
                if f"{name}.alpha" in sd:
                    a.alpha = float(sd[f"{name}.alpha"])
