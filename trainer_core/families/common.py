"""What every family's objective hands the loop: one noised batch and what the prediction is compared with."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoisyBatch:
    x_t: torch.Tensor
    timesteps: torch.Tensor           # what the network is called with
    target: torch.Tensor
    snr: torch.Tensor                 # per sample (used by min-SNR weighting)
    weight: torch.Tensor | None = None  # per-sample loss weight the objective itself asks for (SD3 weighting_scheme)
    sigma: torch.Tensor | None = None   # flow-matching noise level per sample (SD3)

