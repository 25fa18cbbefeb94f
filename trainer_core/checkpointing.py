"""Gradient checkpointing by wrapping block forwards, undone afterwards (the host model is shared)."""
from __future__ import annotations

import contextlib

import torch.utils.checkpoint
from torch import nn


@contextlib.contextmanager
def gradient_checkpointing(blocks: list[nn.Module], enabled: bool = True):
    if not enabled:
        yield
        return
    wrapped = []
    for m in blocks:
        if "forward" in m.__dict__:  # already overridden (e.g. by a LoRA adapter): leave it alone
            continue
        original = m.forward

        def fwd(*args, _f=original, **kwargs):
            return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)
        m.forward = fwd
        wrapped.append(m)
    try:
        yield
    finally:
        for m in wrapped:
            del m.__dict__["forward"]
