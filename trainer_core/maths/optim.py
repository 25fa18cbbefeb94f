"""Optimizers and learning-rate schedules by kohya's names and rules (library/train_util.py get_optimizer,
get_scheduler_fix), each optimizer from a maintained package, imported only when chosen.

``optimizer_args`` go to the optimizer's constructor as given (so each package's own defaults hold, as in
kohya); a class path (``pytorch_optimizer.CAME``, ``torch.optim.RAdam``, or a bare torch.optim name) picks
any optimizer. Named schedules are transformers' scheduler functions (which kohya calls), with kohya's
arguments: warmup/decay given as a fraction < 1 of all steps, ``num_cycles``, ``power``, ``min_lr_ratio``.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..errors import KilnError

PIP_EXTRA = "comfyui-kiln[optimizers]"  # bitsandbytes; the others are in requirements.txt

# kohya name -> (module, class, pip package, fixed kwargs, default kwargs kohya adds)
_OPTIMIZERS = {
    "AdamW": ("torch.optim", "AdamW", None, {}, {}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {}, {}),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", {}, {}),
    "Lion": ("pytorch_optimizer", "Lion", "pytorch-optimizer", {}, {}),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes", {}, {}),
    "PagedLion8bit": ("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes", {}, {}),
    "SGDNesterov": ("torch.optim", "SGD", None, {"nesterov": True}, {"momentum": 0.9}),
    "SGDNesterov8bit": ("bitsandbytes.optim", "SGD8bit", "bitsandbytes", {"nesterov": True}, {"momentum": 0.9}),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers", {}, {}),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}, {}),
    "DAdaptAdam": ("pytorch_optimizer", "DAdaptAdam", "pytorch-optimizer", {}, {}),
    "DAdaptLion": ("pytorch_optimizer", "DAdaptLion", "pytorch-optimizer", {}, {}),
    "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", "schedulefree", {}, {}),
    "RAdamScheduleFree": ("schedulefree", "RAdamScheduleFree", "schedulefree", {}, {}),
    "CAME": ("pytorch_optimizer", "CAME", "pytorch-optimizer", {}, {}),
    "SGD": ("torch.optim", "SGD", None, {}, {"momentum": 0.9, "weight_decay": 0.01}),  # Kiln 0.2's SGD, kept
}
OPTIMIZERS = tuple(_OPTIMIZERS)


def package_of(name: str) -> str | None:
    """The pip package optimizer ``name`` (a kohya name) needs; None for torch's own."""
    return _OPTIMIZERS[name][2]
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "adafactor", "cosine_with_min_lr", "warmup_stable_decay")
_PACKAGE_OF_MODULE = {"pytorch_optimizer": "pytorch-optimizer", "bitsandbytes": "bitsandbytes",
                      "prodigyopt": "prodigyopt", "schedulefree": "schedulefree", "transformers": "transformers",
                      "lion_pytorch": "lion-pytorch", "came_pytorch": "came-pytorch"}


@dataclass
class Schedule:
    """kohya's scheduler options (lr_scheduler and the lr_* keys of training_args)."""
    name: str = "constant"
    warmup_steps: float = 0          # int, or a fraction < 1 of all steps
    decay_steps: float = 0
    num_cycles: int = 1
    power: float = 1.0
    min_lr_ratio: float | None = None
    scheduler_type: str = ""         # a class path, e.g. torch.optim.lr_scheduler.StepLR
    scheduler_args: dict = field(default_factory=dict)


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        root = module.split(".")[0]
        pkg = _PACKAGE_OF_MODULE.get(root, root)
        more = (f"  (or: pip install {PIP_EXTRA})" if pkg == "bitsandbytes" else
                "  (it is in Kiln's requirements.txt: pip install -r custom_nodes/comfyui-kiln/requirements.txt)")
        raise KilnError(f"{what} needs the '{pkg}' package, which is not installed. Install it into ComfyUI's "
                        f"Python: python -m pip install {pkg}{more}.") from e


def resolve_optimizer(name: str) -> tuple[type, dict, dict]:
    """(class, fixed kwargs, kohya's default kwargs) for a kohya name (any case) or a class path."""
    known = {k.lower(): k for k in _OPTIMIZERS}
    if name.lower() in known:
        module, cls, _pip, fixed, defaults = _OPTIMIZERS[known[name.lower()]]
        return getattr(_import(module, f"optimizer {name}"), cls), dict(fixed), dict(defaults)
    module, _, cls = name.rpartition(".")
    mod = _import(module, f"optimizer {name}") if module else torch.optim
    found = getattr(mod, cls, None)
    if not (inspect.isclass(found) and issubclass(found, torch.optim.Optimizer)):
        raise KilnError(f"optimizer {name!r} is neither one of {', '.join(OPTIMIZERS)} nor an optimizer class "
                        f"path such as pytorch_optimizer.CAME or torch.optim.RAdam.")
    return found, {}, {}


def optimizer_kwargs(name: str, args: dict, lr: float) -> tuple[dict, float | None]:
    """kohya's per-optimizer rules on optimizer_args -> (kwargs, the lr to pass). Adafactor: relative_step
    defaults to True (warmup_init forces it) and then the optimizer computes its own lr (lr=None)."""
    kwargs = dict(args)
    if name.lower() == "adafactor":
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init") and not kwargs["relative_step"]:
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            return kwargs, None
    return kwargs, lr


def build_optimizer(name: str, params: Iterable, lr: float, args: dict | None = None) -> torch.optim.Optimizer:
    cls, fixed, defaults = resolve_optimizer(name)
    kwargs, lr_arg = optimizer_kwargs(name, args or {}, lr)
    kwargs = {**defaults, **kwargs, **fixed}
    params = list(params)
    if lr_arg is None:  # Adafactor with relative_step: per-group learning rates have no meaning (kohya drops them)
        params = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in params]
    if cls is torch.optim.AdamW and not {"fused", "foreach"} & set(kwargs):
        # fused: one kernel for all LoRA tensors instead of a Python loop over them
        tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
        if all(t.device.type in ("cuda", "cpu") and t.dtype == torch.float32 for t in tensors):
            kwargs["fused"] = True
    try:
        return cls(params, lr=lr_arg, **kwargs)
    except TypeError as e:
        raise KilnError(f"optimizer {name}: optimizer_args {args or {}} do not fit {cls.__module__}.{cls.__name__} "
                        f"({e}).") from None
    except ValueError as e:
        raise KilnError(f"optimizer {name}: {e} (optimizer_args {args or {}}).") from None


def is_schedule_free(opt) -> bool:
    return hasattr(opt, "train") and hasattr(opt, "eval") and "schedulefree" in type(opt).__module__.lower()


def steps_of(value: float, total: int) -> int:
    """kohya's int_or_float: a fraction < 1 of the total steps, else a step count."""
    return int(value * total) if isinstance(value, float) and value < 1 else int(value)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int, initial_lr: float):
    """The LambdaLR (or class-path scheduler) kohya's get_scheduler_fix builds. Schedule-free optimizers get a
    constant schedule (their own averaging replaces it), as in kohya."""
    if is_schedule_free(optimizer) or (schedule.name == "constant" and not schedule.scheduler_type
                                       and type(optimizer).__name__ != "Adafactor"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # (transformers' constant, unimported)
    kwargs = dict(schedule.scheduler_args)
    if schedule.scheduler_type:
        module, _, cls = schedule.scheduler_type.rpartition(".")
        mod = _import(module, f"lr_scheduler_type {schedule.scheduler_type}") if module else torch.optim.lr_scheduler
        found = getattr(mod, cls, None)
        if found is None:
            raise KilnError(f"lr_scheduler_type {schedule.scheduler_type!r} is not found; give a class path such "
                            f"as torch.optim.lr_scheduler.StepLR.")
        try:
            return found(optimizer, **kwargs)
        except TypeError as e:
            raise KilnError(f"lr_scheduler_type {schedule.scheduler_type}: lr_scheduler_args {kwargs} do not fit "
                            f"({e}).") from None
    name = schedule.name
    if name not in SCHEDULERS:
        raise KilnError(f"unknown lr_scheduler {name!r}; use one of {', '.join(SCHEDULERS)}.")
    opt_mod = _import("transformers.optimization", f"lr_scheduler {name}")
    if name == "adafactor":
        if type(optimizer).__name__ != "Adafactor":
            raise KilnError("lr_scheduler adafactor goes with optimizer Adafactor (relative_step), as in kohya.")
        return opt_mod.AdafactorSchedule(optimizer, initial_lr)
    if type(optimizer).__name__ == "Adafactor" and optimizer.defaults.get("relative_step"):
        return opt_mod.AdafactorSchedule(optimizer, initial_lr)  # kohya switches to it for relative_step
    warmup = steps_of(schedule.warmup_steps, total_steps)
    decay = steps_of(schedule.decay_steps, total_steps)
    fn = opt_mod.TYPE_TO_SCHEDULER_FUNCTION[opt_mod.SchedulerType(name)]
    if name == "constant":
        return fn(optimizer, **kwargs)
    if name == "constant_with_warmup":
        return fn(optimizer, num_warmup_steps=warmup, **kwargs)
    common = dict(num_warmup_steps=warmup, num_training_steps=total_steps)
    if name == "cosine_with_restarts":
        return fn(optimizer, **common, num_cycles=schedule.num_cycles, **kwargs)
    if name == "polynomial":
        return fn(optimizer, **common, power=schedule.power, **kwargs)
    if name == "cosine_with_min_lr":
        return fn(optimizer, **common, num_cycles=schedule.num_cycles / 2,
                  min_lr_rate=schedule.min_lr_ratio or 0.0, **kwargs)
    if name == "warmup_stable_decay":
        return fn(optimizer, num_warmup_steps=warmup, num_stable_steps=total_steps - warmup - decay,
                  num_decay_steps=decay, num_cycles=schedule.num_cycles / 2,
                  min_lr_ratio=schedule.min_lr_ratio or 0.0, **kwargs)
    return fn(optimizer, **common, **kwargs)  # linear, cosine


def kohya_optimizer_name(name: str, args: dict | None) -> str:
    """kohya's ss_optimizer: the class's module path, with the optimizer_args given (``k=v,k=v``)."""
    cls, _, _ = resolve_optimizer(name)
    given = ",".join(f"{k}={v}" for k, v in (args or {}).items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({given})" if given else "")


GLOBAL_STATISTICS = ("prodigy", "dadapt")  # one step size estimated over all parameters together


class FusedBackward:
    """kohya's fused_backward_pass, for any optimizer that updates each parameter from that parameter alone:
    every parameter gets its own optimizer, stepped by a post-accumulate-grad hook the moment its gradient is
    ready, and its gradient is freed at once, so the gradients are never all held together. ``main`` (never
    stepped, so it holds no state) carries the learning rates the schedule sets; each hook reads them."""

    def __init__(self, main: torch.optim.Optimizer, name: str, args: dict | None):
        if any(k in type(main).__name__.lower() for k in GLOBAL_STATISTICS):
            raise KilnError(f"fused_backward_pass cannot be used with {type(main).__name__}: it estimates one step "
                            f"size from all parameters together, which a per-parameter step would change. Use "
                            f"AdamW, Adafactor, Lion, CAME, an 8-bit or a schedule-free optimizer, or turn it off.")
        self.main, self.children, self.handles = main, [], []
        for group in main.param_groups:
            for p in group["params"]:
                child = build_optimizer(name, [{"params": [p], "lr": group["lr"]}], group["lr"] or 0.0, args)
                self.children.append(child)
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook(child, group)))

    @staticmethod
    def _hook(child: torch.optim.Optimizer, group: dict):
        def step(p: torch.Tensor) -> None:
            if group["lr"] is not None:
                child.param_groups[0]["lr"] = group["lr"]
            child.step()
            p.grad = None
        return step

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def state_dict(self) -> dict:
        return {"per_parameter": [c.state_dict() for c in self.children]}

    def load_state_dict(self, state: dict) -> None:
        for child, s in zip(self.children, state["per_parameter"]):
            child.load_state_dict(s)


def check_fused(grad_accum: int, max_grad_norm: float, precision: str) -> None:
    """Where a per-parameter step during backward is not the same training, say why."""
    why = ("gradient_accumulation_steps > 1: the step would come before the other batches' gradients"
           if grad_accum > 1 else
           "max_grad_norm > 0: clipping by the global norm needs every gradient first (set it to 0)"
           if max_grad_norm else
           "fp16: the gradient scaler must see every gradient before any step (use bf16 or fp32)"
           if precision == "fp16" else "")
    if why:
        raise KilnError(f"fused_backward_pass cannot be used with {why}.")
