"""A set of LoRA adapters over one host network, keyed by their kohya names."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .config import ALGORITHMS
from .modules import Adapter, LoRAModule
from .targets import TargetRule, select_targets

# key suffix that only this algorithm writes -> algorithm (how a file's algorithm is told)
_SIGNATURES = (("dora_scale", "dora"), ("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"),
               ("lora_down.weight", "lora"))


def _rank_in(key: str, shape) -> str:
    """The rank a factor's shape says (down/b factors lead with it, up/a factors end with it)."""
    if key.startswith(("lora_down", "lokr_w2_b")) or key.endswith("_b"):
        return str(shape[0])
    if key.startswith(("lora_up", "lokr_w2_a")) or key.endswith("_a"):
        return str(shape[1])
    return "?"


def file_algorithm(sd: dict, name: str) -> str | None:
    """The algorithm a LoRA/LyCORIS file used for module ``name`` (None: the module is not in the file)."""
    return next((algo for key, algo in _SIGNATURES if f"{name}.{key}" in sd), None)


class Adapters(nn.ModuleDict):
    """Adapters by file name. A name may hold dots (Train LoRA (any model) names modules as ComfyUI does,
    ``diffusion_model.blocks.0.attn.qkv``), which torch forbids in a submodule's name: stored with ``:`` instead."""

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", ":")

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(self._key(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(self._key(name), module)

    def __contains__(self, name) -> bool:
        return super().__contains__(self._key(name))

    def __iter__(self):
        return (k.replace(":", ".") for k in super().__iter__())

    def keys(self):
        return list(self)

    def items(self):
        return [(k.replace(":", "."), m) for k, m in super().items()]


class LoRANetwork(nn.Module):
    """All adapters of one training run. ``name_of(path)`` turns a host module path into a kohya
    name (e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``)."""

    switchable = True  # set_enabled(False) gives the frozen model's own prediction

    def __init__(self, root: nn.Module, rules: list[TargetRule], name_of: Callable[[str], str],
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, seed: int = 0,
                 algorithm: str = "lora", factor: int = -1, full_matrix: bool = False,
                 rank_of: Callable[[str, bool, int, float], tuple[int, float]] | None = None):
        super().__init__()
        self.init = torch.Generator().manual_seed(seed)  # the same seed gives the same starting adapters
        self.dropouts = (dropout, rank_dropout, module_dropout)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; one of {ALGORITHMS}")
        self.algorithm, self.factor, self.full_matrix = algorithm, factor, full_matrix
        self.rank_of = rank_of      # (name, is 3x3 conv, rank, alpha) -> (rank, alpha): kohya's block_dims
        self.block_lr = None        # UNet name -> (block label, lr multiplier): kohya's *_lr_weight
        self.plus: dict[str, float] = {}  # "unet" / "text_encoder" -> LoRA+ ratio
        self.adapters = Adapters()
        self.paths: dict[str, str] = {}  # kohya name -> host module path
        self.groups: dict[str, str] = {}  # kohya name -> "unet" or a text encoder (own learning rate)
        self.add(root, rules, name_of, "unet")

    def add(self, root: nn.Module, rules: list[TargetRule], name_of: Callable[[str], str], group: str) -> int:
        """Adapters on a second host network (a text encoder); returns how many were added."""
        before = len(self.adapters)
        for path, module, rank, alpha in select_targets(root, rules):
            name = name_of(path)
            if group == "unet" and self.rank_of is not None:
                conv3x3 = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
                rank, alpha = self.rank_of(name, conv3x3, rank, alpha)
                if rank <= 0:
                    continue
            if name in self.adapters:
                raise RuntimeError(f"two modules map to the LoRA name {name}")
            self.adapters[name] = self.make_adapter(name, module, rank, alpha)
            self.paths[name] = path
            self.groups[name] = group
        return len(self.adapters) - before

    def make_adapter(self, name: str, module: nn.Module, rank: int, alpha: float) -> Adapter:
        dropout, rank_dropout, module_dropout = self.dropouts
        if self.algorithm == "lora":
            return LoRAModule(name, module, rank, alpha, dropout, rank_dropout, module_dropout, self.init)
        from . import lycoris_algos as ly  # imports the optional lycoris-lora package
        if self.algorithm == "dora":
            return ly.DoRAModule(name, module, rank, alpha, dropout, rank_dropout, module_dropout, self.init)
        if self.algorithm == "loha":
            return ly.LoHaModule(name, module, rank, alpha, module_dropout, self.init)
        return ly.LoKrModule(name, module, rank, alpha, module_dropout, self.init, self.factor, self.full_matrix)

    def param_groups(self, lr: float, group_lrs: dict[str, float]) -> list[dict]:
        """Optimizer parameter groups, one per adapter group (UNet, each text encoder) at its own learning rate;
        with ``block_lr`` (UNet name -> (block label, multiplier)) one per UNet block, and with LoRA+ ratios
        (``plus``: group -> ratio) the ``lora_up`` matrices in their own group at lr · ratio, as kohya builds
        them (a block whose multiplier is 0 has no adapters at all: see blocks.block_plan)."""
        groups: dict[tuple[str, bool], dict] = {}
        for name, a in self.adapters.items():
            group = self.groups[name]
            label, mult = (group, 1.0) if group != "unet" or self.block_lr is None else self.block_lr(name)
            ratio = self.plus.get("unet" if group == "unet" else "text_encoder")
            for pname, p in a.named_parameters():
                if not p.requires_grad:
                    continue
                plus = ratio is not None and "lora_up" in pname
                rate = group_lrs.get(group, lr) * mult * (ratio if plus else 1.0)
                entry = groups.setdefault((label, plus), {"params": [], "lr": rate,
                                                          "name": label + (" plus" if plus else "")})
                entry["params"].append(p)
        return list(groups.values())

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
        """``<name>.<key>`` per adapter with kohya/LyCORIS keys (``lora_down.weight``, ``hada_w1_a``, ``lokr_w1``,
        ``dora_scale``, ``alpha``...); copies: a snapshot taken mid-training must not follow the live weights."""
        return {f"{name}.{key}": t.detach().to("cpu", dtype, copy=True).contiguous()
                for name, a in self.adapters.items() for key, t in a.state_items().items()}

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Start from a saved file (resume, kohya's network_weights): every adapter must be in it, with the same
        algorithm and shapes; the message says which module differs and how."""
        missing = [n for n in self.adapters if file_algorithm(sd, n) is None]
        if missing:
            raise KeyError(f"{len(missing)} of {len(self.adapters)} modules are missing from the file, e.g. "
                           f"{missing[0]}")
        for name, a in self.adapters.items():
            found = file_algorithm(sd, name)
            if found != a.algorithm:
                raise KeyError(f"{name} was trained with algorithm {found!r} in the file, this run uses "
                               f"{a.algorithm!r}")
            ours = a.state_items()
            absent = [k for k in ours if f"{name}.{k}" not in sd and k != "alpha"]
            if absent:
                raise KeyError(f"{name}.{absent[0]} is not in the file (another rank, or LoKr factor/full_matrix)")
            for key, t in ours.items():
                have = sd.get(f"{name}.{key}")
                if key != "alpha" and tuple(have.shape) != tuple(t.shape):
                    # copy_ would broadcast a rank-1 file into every row of a rank-4 adapter
                    raise ValueError(f"{name}: the file has rank {_rank_in(key, have.shape)} ({key} "
                                     f"{tuple(have.shape)}), this {a.algorithm} adapter rank {a.rank} "
                                     f"({tuple(t.shape)})")
        for name, a in self.adapters.items():  # everything checked: nothing is half loaded
            a.load_items({k: sd[f"{name}.{k}"] for k in a.state_items() if f"{name}.{k}" in sd})
