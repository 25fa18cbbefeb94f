"""VAE: pixels to latents for the latent cache, fp32 encodes of a half VAE (kohya's no_half_vae), and an id of
the VAE for the cache key."""
from __future__ import annotations

import contextlib
import copy
import hashlib

import torch

from . import compat
from .private import private_patcher
from .tensors import fingerprint


def vae_encoder(vae):
    """fn(BCHW pixels in [0,1]) -> raw latents, via ComfyUI's VAE (which wants BHWC)."""
    return lambda px: vae.encode(px.permute(0, 2, 3, 1).contiguous())


@contextlib.contextmanager
def vae_in_fp32(vae, notes: list[str] | None = None):
    """A VAE computing in fp32 for a while (kohya's no_half_vae); the given VAE is exactly as it was afterwards.

    A classic VAE is cast in place: fp16/bf16 -> fp32 -> back is lossless, and ComfyUI's VAE reads ``vae_dtype``
    for every encode. Under dynamic VRAM the weights are staged to the GPU in the dtype recorded when the VAE was
    loaded, so casting them in place would still compute with half weights: the encode runs on ComfyUI's
    non-dynamic copy of the VAE instead (its cost goes to ``notes``)."""
    target = vae
    if vae.vae_dtype != torch.float32 and compat.is_dynamic(vae.patcher):
        patcher, note = private_patcher(vae.patcher, "VAE", "Cache Latents, no_half_vae")
        target = copy.copy(vae)
        target.patcher = patcher
        target.first_stage_model = patcher.model
        if notes is not None:
            notes.append(note)
    original = target.vae_dtype
    if original == torch.float32:
        yield target
        return
    target.first_stage_model.to(torch.float32)
    target.vae_dtype = torch.float32
    try:
        yield target
    finally:
        target.first_stage_model.to(original)
        target.vae_dtype = original


def vae_identity(vae) -> str:
    """A stable id of the VAE (the latent cache's key): every tensor's fingerprint plus the dtype the VAE
    computes in (fp16 and fp32 encodes differ)."""
    h = hashlib.sha256()
    sd = vae.first_stage_model.state_dict()
    for k in sorted(sd):
        fingerprint(h, k, sd[k])
    h.update(str(getattr(vae, "vae_dtype", "")).encode())
    return h.hexdigest()[:16]
