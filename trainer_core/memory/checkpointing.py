"""Gradient checkpointing by wrapping block forwards, undone afterwards (the host model is shared).

With ``offload`` (kohya's cpu_offload_checkpointing) the tensors each checkpointed block keeps for its backward
(its inputs) wait in host memory instead of on the device. Not torch's save_on_cpu, which keeps a tensor already on
the host as it is: here every input is copied wherever it lives, so the CPU test runs the path a GPU takes.

A checkpointed block computes on copies of its tensor inputs: ComfyUI's Flux blocks add their residuals into their
inputs in place (``img += ...``, ``x += ...``), which would change the inputs the checkpoint keeps for the recompute
(autograd refuses: "modified by an inplace operation"). The copies live only while the block runs."""
from __future__ import annotations

import contextlib

import torch.utils.checkpoint
from torch import nn

from . import storage


def _on_host(t: torch.Tensor):
    return t.device, storage.host_copy(t)


def _back(packed) -> torch.Tensor:
    device, t = packed
    return t.to(device, non_blocking=True)


def _on_copies(f, *args, **kwargs):
    """``f`` on copies of its tensor arguments (see the module docstring)."""
    def copy(a):
        return a.clone() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
    return f(*map(copy, args), **{k: copy(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def gradient_checkpointing(blocks: list[nn.Module], enabled: bool = True, offload: bool = False):
    if not enabled:
        yield
        return
    wrapped = []
    for m in blocks:
        if "forward" in m.__dict__:  # already overridden (e.g. by a LoRA adapter): leave it alone
            continue
        original = m.forward

        def fwd(*args, _f=original, **kwargs):
            saved = torch.autograd.graph.saved_tensors_hooks(_on_host, _back) if offload else contextlib.nullcontext()
            with saved:
                return torch.utils.checkpoint.checkpoint(_on_copies, _f, *args, use_reentrant=False, **kwargs)
        m.forward = fwd
        wrapped.append(m)
    try:
        yield
    finally:
        for m in wrapped:
            del m.__dict__["forward"]
