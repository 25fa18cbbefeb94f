"""kohya's noise options for the DDPM families (SD1/SDXL), drawn from the loop's seeded generator.

Formulas: kohya-ss/sd-scripts library/custom_train_functions.py (apply_noise_offset, pyramid_noise_like) and
train_util.get_noise_noisy_latents_and_timesteps (order: offset, then multires, then input perturbation,
which moves only the noised input; the target keeps the unperturbed noise). ``opts`` is the run's noise settings
(TrainConfig.noise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def offset_noise(x0: torch.Tensor, noise: torch.Tensor, offset: float | torch.Tensor,
                 adaptive_noise_scale: float | None, generator: torch.Generator) -> torch.Tensor:
    """noise + offset·n, n ~ N(0, 1) per sample and channel; with adaptive_noise_scale the offset grows by
    |channel mean of the latent| × scale (never below 0)."""
    if adaptive_noise_scale is not None:
        offset = (offset + adaptive_noise_scale * x0.mean(dim=(2, 3), keepdim=True).abs()).clamp_min(0.0)
    n = torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator).to(noise.device, noise.dtype)
    return noise + offset * n


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise: level i adds noise drawn at size/r^i (r uniform in [2, 4)), upsampled
    bilinearly, weighted discount^i; stops at 1 pixel; the sum is scaled back to unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        low = torch.randn((b, c, hn, wn), generator=generator).to(noise.device, noise.dtype)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def strength(value: float, random_strength: bool, generator: torch.Generator) -> float:
    """kohya's *_random_strength: one draw in [0, value] per batch."""
    return float(torch.rand((), generator=generator)) * value if random_strength else value


def shaped_noise(x0: torch.Tensor, noise: torch.Tensor, opts, generator: torch.Generator) -> torch.Tensor:
    """The noise the target is built from (offset, then multires)."""
    if opts.noise_offset:
        noise = offset_noise(x0, noise, strength(opts.noise_offset, opts.noise_offset_random_strength, generator),
                             opts.adaptive_noise_scale, generator)
    if opts.multires_noise_iterations:
        noise = pyramid_noise(noise, opts.multires_noise_iterations, opts.multires_noise_discount, generator)
    return noise


def input_noise(noise: torch.Tensor, opts, generator: torch.Generator) -> torch.Tensor:
    """The noise that goes into x_t: with ip_noise_gamma, noise + γ·n (input perturbation, arXiv 2301.11706)."""
    if not opts.ip_noise_gamma:
        return noise
    g = strength(opts.ip_noise_gamma, opts.ip_noise_gamma_random_strength, generator)
    return noise + g * torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
