"""Inference tensors made usable by autograd without copying them, and cheap fingerprints of weights.

ComfyUI runs nodes under ``torch.inference_mode()``, so the loaded weights are inference tensors, which autograd
refuses to save for backward (docs/architecture.md, fact 1)."""
from __future__ import annotations

import contextlib

import torch


def _alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor over an inference tensor's storage: autograd can save it, nothing is copied."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


@contextlib.contextmanager
def autograd_views(module: torch.nn.Module):
    """Swap inference-mode parameters/buffers for aliases; restore the exact originals afterwards."""
    swapped = []
    with torch.inference_mode(False):
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        alias = _alias(t)
                        store[name] = torch.nn.Parameter(alias, requires_grad=False) if store is m._parameters else alias
                        swapped.append((store, name, t))
        try:
            yield module
        finally:
            for store, name, original in reversed(swapped):
                store[name] = original


def _copy_input(module, args):
    return (args[0].clone(),) + tuple(args[1:]) if torch.is_grad_enabled() else None


@contextlib.contextmanager
def norm_input_copies(module: torch.nn.Module):
    """While gradients are on, every LayerNorm inside ``module`` gets a copy of its input (a forward pre-hook,
    removed afterwards). ComfyUI's CLIP, T5 and Flux blocks add residuals in place (``x += attn(norm(x))``, ``img +=
    ...``), which autograd refuses once the norm saved ``x`` for backward (docs/architecture.md, fact 11)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")]
    hooks = [m.register_forward_pre_hook(_copy_input) for m in norms]
    try:
        yield module
    finally:
        for h in hooks:
            h.remove()


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A non-inference copy of a (small) tensor made inside the node, e.g. conditioning or latents."""
    with torch.inference_mode(False):
        return t.clone() if t.is_inference() else t


def fingerprint(h, name: str, t: torch.Tensor) -> None:
    """Name, shape and a strided sample of the values: a fine-tune of any layer changes it, yet hashing
    costs milliseconds, not a full read of the weights."""
    flat = t.detach().flatten()
    h.update(f"{name}{tuple(t.shape)}".encode())
    h.update(flat[::max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())


def fingerprint_patches(h, patches: dict) -> None:
    """ComfyUI weight patches (an upstream LoRA, trained "set" weights) into the hash: keys, strengths and a
    sample of each patch tensor."""
    for key in sorted(patches):
        for patch in patches[key]:
            h.update(f"{key}{patch[0]}{patch[2]}".encode())  # strength_patch, strength_model
            data = patch[1]
            for i, t in enumerate(data if isinstance(data, (list, tuple)) else [data]):
                if isinstance(t, torch.Tensor):
                    fingerprint(h, f"{key}.{i}", t)
                else:
                    h.update(repr(type(t)).encode())
