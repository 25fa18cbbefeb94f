"""Losses measured without training: in eval mode (no dropout) and with fixed draws, so two measurements of the
same weights give the same number. The probe batch is measured before and after a run; the validation loss is
kohya's, over the held-out images (validation.py)."""
from __future__ import annotations

import torch

from .batch_loss import StepInputs, batch_loss
from ..data.cache import LatentCache


def optimizer_mode(optimizers: list, train: bool) -> None:
    """Schedule-free optimizers keep separate train/eval weights; other optimizers have no mode."""
    for o in optimizers:
        if hasattr(o, "train" if train else "eval"):
            o.train() if train else o.eval()


def probe_batch(cache: LatentCache, batch_size: int) -> list[int]:
    """Up to ``batch_size`` samples of one latent shape, the same ones each time."""
    probe = sorted(range(len(cache.samples)), key=lambda i: tuple(cache.samples[i].latent.shape))[:max(1, batch_size)]
    return [i for i in probe if cache.samples[i].latent.shape == cache.samples[probe[0]].latent.shape]


def probe_loss(inputs: StepInputs, cache: LatentCache, probe: list[int]) -> float:
    """The probe batch's loss with its own noise and timesteps (seed + 1)."""
    network = inputs.network
    was_training = network.training
    network.eval()
    with torch.no_grad():
        loss = float(batch_loss(inputs, cache, probe, torch.Generator().manual_seed(inputs.cfg.seed + 1), train=False))
    network.train(was_training)
    return loss


def validation_loss(inputs: StepInputs, source: LatentCache, batches: list[list[int]], timesteps: list[int],
                    optimizers: list) -> float:
    """Mean loss over the validation batches × fixed timesteps, noise from validation_seed (kohya)."""
    cfg = inputs.cfg
    inputs.network.eval()
    optimizer_mode(optimizers, train=False)
    seed = cfg.validation.validation_seed
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    with torch.no_grad():
        losses = [float(batch_loss(inputs, source, b, gen, train=False, timestep=t))
                  for b in batches for t in timesteps]
    optimizer_mode(optimizers, train=True)
    inputs.network.train()
    return sum(losses) / len(losses)
