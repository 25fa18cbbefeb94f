"""What the training loop asks of what it trains and of the family it trains for.

Two networks train through one loop: LoRA adapters over a frozen model (lora.network.LoRANetwork) and a model's
own weights (full.FullNetwork, DreamBooth); each family's objective (made by families/layer.py from
ComfyUI's model sampling: sd1.SD1Objective for DDPM, flow.FlowObjective for SD3 and Flux) turns clean latents into a noised batch and scores a prediction. The
members are the whole contract: the loop probes for nothing else.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch import nn

from ..families.common import NoisyBatch


class TrainableNetwork(Protocol):
    training: bool
    # the base model's own prediction is one set_enabled(False) away (differential output preservation needs it)
    switchable: bool

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def param_groups(self, lr: float, group_lrs: dict[str, float]) -> list[dict]:
        """Optimizer groups, each with a "name" and its own "lr"."""

    def to(self, device=None, dtype=None): ...

    def train(self, mode: bool = True): ...

    def eval(self): ...


class SwitchableNetwork(TrainableNetwork, Protocol):
    """A network whose ``switchable`` is True: its adapters can be switched off for a step."""

    def set_enabled(self, on: bool) -> None: ...


class Objective(Protocol):
    num_timesteps: int  # the timestep range validation spreads its fixed timesteps over

    def sample(self, x0: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Timesteps and noise drawn from ``generator`` (in a fixed order: a resumed run draws the same)."""

    def at(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> NoisyBatch:
        """The batch noised at given timesteps with given noise (validation's fixed draws)."""

    def output(self, pred: torch.Tensor, nb: NoisyBatch) -> torch.Tensor:
        """The network's prediction in the space of ``nb.target``."""

    def huber_c(self, nb: NoisyBatch, schedule: str, c: float, scale: float) -> torch.Tensor:
        """kohya's huber threshold per sample."""

    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ weight per sample (a family without it refuses)."""

    def loss_weight(self, snr: torch.Tensor, loss) -> torch.Tensor | None:
        """kohya's per-sample weights after min-SNR, from the loss settings (TrainConfig.loss); None where the
        family has none."""
