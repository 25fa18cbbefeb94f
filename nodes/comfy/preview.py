"""Sample images from the model as it is during training (LoRA attached or not), with ComfyUI's sampler."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import comfy.sample


def sample_images(model, cond, vae, prompts: list[str], seed: int, steps: int, cfg: float,
                  width: int, height: int, sampler: str = "euler", scheduler: str = "normal",
                  negative: str = "") -> torch.Tensor:
    """IMAGE [B,H,W,3]; ``model`` is the patcher that trains (text.TextConditioning gives the conditioning)."""
    images = []
    neg = cond.comfy_conditioning(negative)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            latent = torch.zeros([1, model.model.latent_format.latent_channels, height // 8, width // 8])
            noise = comfy.sample.prepare_noise(latent, seed + i)
            out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, cond.comfy_conditioning(prompt),
                                      neg, latent, seed=seed + i, disable_pbar=True)
            images.append(vae.decode(out).float().cpu().clamp(0, 1))
    return torch.cat(images)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def pil_to_image(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
