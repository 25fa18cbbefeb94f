"""Sample images from the model as it is during training (LoRA attached or not), with ComfyUI's sampler."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import comfy.sample
import comfy.samplers


@dataclass(frozen=True)
class PreviewSpec:
    """One preview: a prompt with every setting resolved (kohya's per-line options over the node's widgets)."""
    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    cfg: float
    sampler: str = "euler"
    scheduler: str = "normal"


def known_sampler(sampler: str, scheduler: str) -> bool:
    return sampler in comfy.samplers.KSampler.SAMPLERS and scheduler in comfy.samplers.KSampler.SCHEDULERS


def sample_images(model, cond, vae, specs: list[PreviewSpec], on_image=None) -> torch.Tensor:
    """IMAGE [B,H,W,3]; ``model`` is the patcher that trains (text.TextConditioning gives the conditioning).
    Previews of different sizes are placed top-left on the largest canvas (an IMAGE batch has one size).
    ``on_image(n)``: called as the n-th image (from 1) starts."""
    images = []
    with torch.no_grad():
        for n, s in enumerate(specs, 1):
            if on_image is not None:
                on_image(n)
            latent = torch.zeros([1, model.model.latent_format.latent_channels, s.height // 8, s.width // 8])
            noise = comfy.sample.prepare_noise(latent, s.seed)
            out = comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler, s.scheduler,
                                      cond.comfy_conditioning(s.prompt), cond.comfy_conditioning(s.negative), latent,
                                      seed=s.seed, disable_pbar=True)
            images.append(vae.decode(out).float().cpu().clamp(0, 1))
    h, w = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    canvas = torch.zeros(len(images), h, w, 3)
    for k, image in enumerate(images):
        canvas[k, :image.shape[1], :image.shape[2]] = image[0]
    return canvas


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def pil_to_image(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
