"""Full fine-tuning (kohya's train_db.py, DreamBooth): the "adapter" is the base weights themselves.

``FullNetwork`` gives the loop what a LoRANetwork gives it (contracts.TrainableNetwork: parameters, parameter
groups with their own learning rates, train/eval), over every weight of the host modules it was given. The host
modules are shared with the rest of the graph, so nothing trains in them for good:

* each weight gets a float32 trainable tensor installed in its place for the run;
* the weight it replaced is kept, untouched, as it was: on the host it is its own backup (no copy); on an
  accelerator its values go to host memory and its device storage is freed while training, so the device
  never holds the trained and the original weights together (its storage is refilled on ``restore``);
* ``restore`` puts back the very tensor objects the modules held (same storage, same values), and ``trained``
  hands out the trained weights, in the original dtype, for the caller to give to a new model.

No ComfyUI here: the host modules are plain ``nn.Module`` trees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..memory import storage


@dataclass
class _Slot:
    module: nn.Module
    name: str                      # attribute in module._parameters
    key: str                       # state-dict key (group prefix + module path + name)
    original: torch.Tensor         # the tensor the module held; put back as this very object
    backup: torch.Tensor | None    # its values on the host, when its device storage was freed for the run
    param: nn.Parameter            # what trains (float32)


class FullNetwork:
    """Every weight of the added modules trains; groups ("unet", "clip_l", ...) take their own learning rates."""

    switchable = False  # no adapters: the model without its training is not at hand

    def __init__(self):
        self.slots: dict[str, list[_Slot]] = {}
        self.training = True
        self.freed_bytes = 0       # device bytes released while training (originals moved to the host)

    def add(self, root: nn.Module, group: str, prefix: str = "", keep: Callable[[str], bool] = lambda key: True) -> int:
        """Make every parameter of ``root`` whose key ``keep`` accepts trainable, in group ``group``; returns
        how many tensors. Must run outside inference mode (the new tensors are ordinary ones)."""
        slots = self.slots.setdefault(group, [])
        seen: set[int] = set()
        for mod_name, module in root.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                key = prefix + (f"{mod_name}.{name}" if mod_name else name)
                if not keep(key):
                    continue
                with torch.no_grad():
                    param = nn.Parameter(p.detach().to(torch.float32, copy=True), requires_grad=True)
                backup = None
                if p.device.type != "cpu" and storage.frees_cleanly(p):
                    backup = storage.host_copy(p)
                    self.freed_bytes += storage.free(p)
                module._parameters[name] = param
                slots.append(_Slot(module, name, key, p, backup, param))
        return sum(1 for _ in slots)

    def __len__(self) -> int:
        return sum(len(s) for s in self.slots.values())

    def parameters(self) -> Iterator[nn.Parameter]:
        for slots in self.slots.values():
            for s in slots:
                yield s.param

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, lr: float, group_lrs: dict[str, float]) -> list[dict]:
        """One optimizer group per added group, at ``group_lrs[group]`` or ``lr``."""
        return [{"params": [s.param for s in slots if s.param.requires_grad], "lr": group_lrs.get(group, lr),
                 "name": group} for group, slots in self.slots.items() if slots]

    def to(self, device=None, dtype=None) -> "FullNetwork":
        """The trainable tensors are made float32 on their module's device already (the loop calls this for
        LoRA adapters, which are created on the host)."""
        return self

    def train(self, mode: bool = True) -> "FullNetwork":
        self.training = mode
        return self

    def eval(self) -> "FullNetwork":
        return self.train(False)

    def trained(self, group: str) -> dict[str, torch.Tensor]:
        """The group's trained weights by key, on the host, in each original weight's dtype (the trainable
        tensor itself where that is already so: no copy)."""
        out = {}
        for s in self.slots.get(group, []):
            out[s.key] = s.param.detach().to("cpu", dtype=s.original.dtype)
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Set the trainable tensors from ``weights`` (a saved run's, by key) before training continues from it.
        Returns (missing, mismatched) keys: nothing is set when a shape differs; a missing key keeps its value."""
        slots = [s for group in self.slots.values() for s in group]
        missing = [s.key for s in slots if s.key not in weights]
        mismatched = [s.key for s in slots if s.key in weights and tuple(weights[s.key].shape) != tuple(s.param.shape)]
        if not mismatched:
            with torch.no_grad():
                for s in slots:
                    if s.key in weights:
                        s.param.copy_(weights[s.key].to(s.param.device, torch.float32))
        return missing, mismatched

    def state_weights(self) -> dict[str, torch.Tensor]:
        """The trainable float32 tensors on the host, for a resumable state when a saved checkpoint holds them in
        a narrower dtype (resuming from fp16 values would not continue the same run)."""
        return {s.key: s.param.detach().to("cpu", copy=True) for group in self.slots.values() for s in group}

    def restore(self) -> None:
        """Put the original tensors back into their modules, with their storage and values as they were.
        Safe to call twice (after an error, and again on the way out)."""
        for slots in self.slots.values():
            for s in slots:
                if s.module._parameters.get(s.name) is s.original:
                    continue
                if s.backup is not None:
                    storage.refill(s.original, s.backup)
                    s.backup = None
                s.module._parameters[s.name] = s.original
        self.freed_bytes = 0
