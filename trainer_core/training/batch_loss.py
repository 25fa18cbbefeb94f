"""The loss of one batch: its tensors, the objective's noisy draw, the prediction, kohya's weightings, and the
preservation term. Every RNG is drawn for the whole batch on every rank, so the draws stay in step across ranks
and across a resume, and each sample gets what a single process would give it."""
from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..data.cache import LatentCache
from .contracts import Objective, SwitchableNetwork, TrainableNetwork
from ..data.captions import augment_caption, base_caption
from ..families.common import NoisyBatch
from ..maths.losses import elementwise, per_sample_loss
from ..maths.preservation import preservation_caption

if TYPE_CHECKING:
    from .loop import TrainConfig


@dataclass(frozen=True)
class StepInputs:
    """What every loss of a run is computed with. ``forward(x_t, timesteps, cond)`` runs the frozen host network
    with what trains attached; ``conditioning(captions, train=..., geometries=...)`` turns captions (and, for
    SDXL's size conditioning, each drawn sample's geometry) into its conditioning tensors (``train=False``: no
    random text-encoder dropout); ``latent_in`` maps cached latents into the network's latent space."""
    network: TrainableNetwork
    objective: Objective
    forward: Callable
    conditioning: Callable[..., dict]
    latent_in: Callable[[torch.Tensor], torch.Tensor]
    cfg: TrainConfig
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32
    flip_rng: random.Random             # flip_aug: each drawn sample is mirrored with p = 0.5

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def condition(self, captions: list[str], train: bool, geometries: list) -> dict:
        cond = self.conditioning(captions, train=train, geometries=geometries)
        return {k: v.to(self.device) for k, v in cond.items()}


@dataclass(frozen=True)
class Batch:
    x0: torch.Tensor
    mask: torch.Tensor | None
    weights: torch.Tensor  # per sample: prior_loss_weight for a regularization image, else 1
    cond: dict
    captions: list[str]
    geometries: list       # SDXL's size/crop conditioning


def batch_tensors(inputs: StepInputs, source: LatentCache, indices: list[int], part: slice, train: bool, epoch: int,
                  caption_rng: random.Random | None) -> Batch | None:
    """The tensors of this rank's ``part`` of the batch ``indices``; None when that part is empty. Training draws
    a flip and kohya's caption augmentation for each sample; the probe and validation (train=False) are never
    mirrored and see the steady captions."""
    samples = [source.samples[i] for i in indices]
    flips = [train and inputs.flip_rng.random() < 0.5 for _ in samples]
    captions = [augment_caption(s.caption, s.captions, caption_rng, epoch) if train
                else base_caption(s.caption, s.captions) for s in samples]
    samples, flips, captions = samples[part], flips[part], captions[part]
    if not samples:
        return None
    views = [s.view(f) for s, f in zip(samples, flips)]
    geometries = [s.drawn_geometry(f) for s, f in zip(samples, flips)]
    x0 = inputs.latent_in(torch.stack([latent for latent, _ in views]).to(inputs.device))
    masks = [m for _, m in views]
    mask = torch.stack(masks).to(inputs.device) if all(m is not None for m in masks) else None
    reg_weight = inputs.cfg.loss.prior_loss_weight
    weights = torch.tensor([reg_weight if s.is_reg else 1.0 for s in samples], device=inputs.device)
    return Batch(x0, mask, weights, inputs.condition(captions, train, geometries), captions, geometries)


def noisy_share(objective: Objective, x0: torch.Tensor, n: int, part: slice,
                generator: torch.Generator) -> NoisyBatch:
    """The objective's draw (timesteps, noise) for the whole batch of ``n``, this rank's rows (``x0``) kept: every
    sample gets the noise a single process would give it, and no two ranks share a draw."""
    if x0.shape[0] == n:
        return objective.sample(x0, generator)
    full = x0.new_zeros((n,) + tuple(x0.shape[1:]))
    full[part] = x0
    nb = objective.sample(full, generator)
    return dataclasses.replace(nb, **{f.name: getattr(nb, f.name)[part] for f in dataclasses.fields(nb)
                                      if torch.is_tensor(getattr(nb, f.name)) and getattr(nb, f.name).dim()
                                      and getattr(nb, f.name).shape[0] == n})


def predict(inputs: StepInputs, x_t: torch.Tensor, t: torch.Tensor, captions: list[str],
            geometries: list) -> torch.Tensor:
    cond = inputs.condition(captions, True, geometries)
    with inputs.autocast():
        return inputs.forward(x_t, t, cond).float()


def preservation_loss(inputs: StepInputs, nb: NoisyBatch, batch: Batch) -> torch.Tensor | float:
    """The trained prediction for each class prompt against the base's (adapters off), same x_t and t."""
    pairs = inputs.cfg.preservation_pairs
    keep = [(k, p) for k, c in enumerate(batch.captions) if (p := preservation_caption(c, pairs)) is not None]
    if not keep:
        return 0.0
    idx = torch.tensor([k for k, _ in keep], device=nb.x_t.device)
    prompts, geos = [p for _, p in keep], [batch.geometries[k] for k, _ in keep]
    x_t, t = nb.x_t[idx], nb.timesteps.to(idx.device)[idx]
    network: SwitchableNetwork = inputs.network  # train() refuses preservation for one that is not switchable
    network.set_enabled(False)
    try:
        with torch.no_grad():
            base = predict(inputs, x_t, t, prompts, geos)
    finally:
        network.set_enabled(True)
    return torch.nn.functional.mse_loss(predict(inputs, x_t, t, prompts, geos), base)


def batch_loss(inputs: StepInputs, source: LatentCache, indices: list[int], generator: torch.Generator, *,
               train: bool = True, epoch: int = 1, caption_rng: random.Random | None = None,
               timestep: int | None = None, part: slice | None = None) -> torch.Tensor | None:
    """The loss of ``indices`` (this rank's ``part`` of them); None when that part is empty (the RNGs were still
    drawn for the whole batch). ``timestep``: validation's fixed timestep, noise from ``generator`` alone."""
    cfg, objective, device = inputs.cfg, inputs.objective, inputs.device
    part = slice(0, len(indices)) if part is None else part
    batch = batch_tensors(inputs, source, indices, part, train, epoch, caption_rng)
    if batch is None:
        shape = tuple(inputs.latent_in(source.samples[indices[0]].latent[None].to(device)).shape[1:])
        noisy_share(objective, torch.zeros((0,) + shape, device=device), len(indices), part, generator)
        return None
    x0 = batch.x0
    if timestep is None:
        nb = noisy_share(objective, x0, len(indices), part, generator)
    else:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        nb = objective.at(x0, torch.full((x0.shape[0],), timestep, dtype=torch.long), noise)
    with inputs.autocast():
        pred = inputs.forward(nb.x_t, nb.timesteps, batch.cond)
    huber_c = None
    if cfg.loss.loss_type in ("huber", "smooth_l1"):
        huber_c = objective.huber_c(nb, cfg.loss.huber_schedule, cfg.loss.huber_c, cfg.loss.huber_scale).to(device)
    err = elementwise(objective.output(pred, nb), nb.target, cfg.loss.loss_type, huber_c)
    per_sample = per_sample_loss(err, batch.mask, cfg.loss.mask_normalize)
    if nb.weight is not None:
        per_sample = per_sample * nb.weight.to(device)
    if cfg.loss.min_snr_gamma:
        per_sample = per_sample * objective.min_snr_weight(nb.snr, cfg.loss.min_snr_gamma).to(device)
    if (post_weight := objective.loss_weight(nb.snr, cfg.loss)) is not None:
        per_sample = per_sample * post_weight.to(device)
    loss = (per_sample * batch.weights).mean()
    if train and cfg.preservation.diff_output_preservation:
        loss = loss + cfg.preservation.diff_output_preservation_multiplier * preservation_loss(inputs, nb, batch)
    return loss
