"""Rectified flow, the parameterisation ComfyUI calls CONST (SD3, FLUX.1, Chroma, and most DiTs since):
x_t = (1 − σ)·x0 + σ·ε, and the network's raw output is the velocity ε − x0 (docs/architecture.md, fact 5).

One objective for every flow family; what differs between them is data handed in:
  * how σ is drawn (SD3: kohya's weighting_scheme density + training_shift, on integer timesteps; Flux: kohya's
    timestep_sampling) — a ``draw(n, generator, latent_shape) -> σ`` function;
  * what the network is called with: ComfyUI's own ``model_sampling.timestep(σ)`` (SD3: σ·1000, Flux: σ), handed
    in as a plain callable by the node;
  * what the prediction is compared with (kohya): the target ``velocity`` ε − x0 (Flux) or ``x0`` (SD3), and the
    prediction as kohya's model_prediction_type reads it: ``raw`` (as it is), ``additive`` (+ x_t) or
    ``sigma_scaled`` (x_t − σ·v̂: the implied x0, then weighted per sample by the weighting scheme).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import KilnError
from ..maths.losses import huber_threshold
from .common import NoisyBatch

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode", "cosmap", "sigma_sqrt")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")


def sample_u(scheme: str, n: int, generator: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29) -> torch.Tensor:
    """Timestep density in [0, 1] (diffusers' compute_density_for_timestep_sampling; kohya's weighting_scheme)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64) * logit_std + logit_mean)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weight(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight (diffusers' compute_loss_weighting_for_sd3)."""
    if scheme == "sigma_sqrt":
        return sigma.clamp_min(1e-3) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    return torch.ones_like(sigma)


def shift_u(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The discrete flow shift (kohya's training_shift / discrete_flow_shift, ComfyUI's sampling shift): > 1 moves
    σ to the noisy side, < 1 to the clean side."""
    return u * shift / (1 + (shift - 1) * u)


def per_mille(sigma: torch.Tensor) -> torch.Tensor:
    """σ·1000, the timestep scale kohya's schedules (huber_c) and validation's fixed timesteps are written in."""
    return sigma * 1000


class FlowObjective:
    """The flow objective of one family (see the module docstring); ``sample`` draws σ then ε from the generator."""
    num_timesteps = 1000  # validation's fixed timesteps t give σ = t / 1000

    def __init__(self, draw: Callable[[int, torch.Generator, tuple], torch.Tensor],
                 timestep: Callable[[torch.Tensor], torch.Tensor] = per_mille, target: str = "x0",
                 prediction: str = "sigma_scaled", weighting: str = "uniform"):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"model_prediction_type must be one of {PREDICTION_TYPES}, got {prediction!r}")
        if weighting not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting!r}")
        self.draw, self.timestep, self.target, self.prediction, self.scheme = draw, timestep, target, prediction, \
            weighting

    def sample(self, x0: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        sigma = self.draw(x0.shape[0], generator, tuple(x0.shape)).double()
        noise = torch.randn(x0.shape, generator=generator)
        return self.noised(x0, sigma, noise.to(x0.device, x0.dtype))

    def at(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        return self.noised(x0, t.double() / self.num_timesteps, noise)

    def noised(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        sigma = sigma.to(x0.device)
        s = sigma.to(x0.dtype).view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = x0 if self.target == "x0" else noise - x0
        snr = ((1 - sigma) / sigma.clamp_min(1e-3)) ** 2
        weight = loss_weight(self.scheme, sigma).float() if self.prediction == "sigma_scaled" else None
        return NoisyBatch(x_t, self.timestep(sigma).float(), target, snr.float(), weight, s)

    def output(self, pred: torch.Tensor, nb: NoisyBatch) -> torch.Tensor:
        """The prediction as kohya's model_prediction_type reads it (apply_model_prediction_type)."""
        if self.prediction == "raw":
            return pred.float()
        if self.prediction == "additive":
            return pred.float() + nb.x_t.float()
        return nb.x_t.float() - nb.sigma.float() * pred.float()

    def huber_c(self, nb: NoisyBatch, schedule: str, c: float, scale: float) -> torch.Tensor:
        return huber_threshold(schedule, c, scale, per_mille(nb.sigma.double().view(-1)), self.num_timesteps)

    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        raise KilnError("min_snr_gamma does not apply to flow-matching models (SD3, Flux); use weighting_scheme.")

    def loss_weight(self, snr: torch.Tensor, loss) -> None:
        """None: kohya's SNR post-weights are DDPM's; flow models weigh samples by the weighting scheme."""
        return None
