"""The training loop: one function to read top to bottom (nanoGPT-style).

Everything host-specific comes in as plain callables: ``forward`` runs the frozen network (with the
LoRA adapters attached) and ``conditioning(captions, train=..., geometries=...)`` turns captions (and, for SDXL's size
conditioning, each drawn sample's geometry) into the network's conditioning tensors (``train=False`` for the fixed probe batch: no random text-encoder dropout).
"""
from __future__ import annotations

import contextlib
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import LatentCache
from .checkpointing import gradient_checkpointing
from .data.captions import augment_caption, base_caption
from .errors import KilnError
from .losses import elementwise, per_sample_loss
from .lora.network import LoRANetwork
from .optim import build_optimizer, build_scheduler

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "AdamW"
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    loss_type: str = "l2"
    min_snr_gamma: float = 0.0
    mask_normalize: bool = False
    prior_loss_weight: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    group_lrs: dict = field(default_factory=dict)  # adapter group ("te1", ...) -> its own learning rate
    save_every: int = 0                            # hand a resumable state to on_save every N steps (0: never)


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the node's text, e.g. settings a resume changed
    steps: int = 0
    seconds: float = 0.0
    probe_loss_start: float = float("nan")
    probe_loss_end: float = float("nan")

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)


def epoch_batches(cache: LatentCache, batch_size: int, rng: random.Random) -> list[list[int]]:
    """kohya's epoch: every sample ``repeats`` times, batches never mix buckets nor [[datasets]] blocks (each
    block batched by its own batch_size), batch order shuffled."""
    by_bucket = defaultdict(list)
    size = {}
    for i, s in enumerate(cache.samples):
        key = (s.block, tuple(s.latent.shape))
        by_bucket[key].extend([i] * s.repeats)
        size[key] = s.batch_size or batch_size
    batches = []
    for key in sorted(by_bucket):
        idx, n = by_bucket[key], size[key]
        rng.shuffle(idx)
        batches += [idx[b:b + n] for b in range(0, len(idx), n)]
    rng.shuffle(batches)
    return batches


class BatchStream:
    """(epoch, batch) forever; epochs count from 1, as kohya's (caption_dropout_every_n_epochs reads them).
    Its position (the epoch's starting RNG state and how far into the epoch) can be saved and restored, so a
    resumed run draws exactly the batches the uninterrupted one would have."""

    def __init__(self, cache: LatentCache, batch_size: int, seed: int):
        self.cache, self.batch_size = cache, batch_size
        self.rng = random.Random(seed)
        self.epoch, self.pos, self.batches = 0, 0, []
        self.epoch_start = self.rng.getstate()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, list[int]]:
        if self.pos >= len(self.batches):
            self.epoch += 1
            self.epoch_start = self.rng.getstate()
            self.batches, self.pos = epoch_batches(self.cache, self.batch_size, self.rng), 0
        self.pos += 1
        return self.epoch, self.batches[self.pos - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "rng": self.epoch_start}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.rng.setstate(state["rng"])
        self.batches = epoch_batches(self.cache, self.batch_size, self.rng) if self.epoch else []


NO_CHANGE_CAUSES = ("a model whose output does not depend on its input (e.g. a zero-initialised output layer), "
                    "a learning rate of 0, or masks that are all black")
RESUMABLE_SETTINGS = ("steps", "learning_rate", "group_lrs", "lr_scheduler", "warmup_steps")


def run_settings(cfg: TrainConfig) -> dict:
    """The settings a saved state records; on resume they may differ (and then take effect), except the
    optimizer, whose saved state only fits the optimizer that wrote it."""
    return {"optimizer": cfg.optimizer, **{k: getattr(cfg, k) for k in RESUMABLE_SETTINGS}}


def changed_settings(saved: dict | None, cfg: TrainConfig) -> list[str]:
    """'learning_rate 0.002 → 1e-05', ... for every setting that differs from the saved run's; refuses a
    different optimizer."""
    if not saved:
        return []
    now = run_settings(cfg)
    if saved.get("optimizer", now["optimizer"]) != now["optimizer"]:
        raise KilnError(f"the state to resume was written by optimizer {saved['optimizer']}, and its moments do not "
                        f"fit {now['optimizer']}: set optimizer back to {saved['optimizer']}, or rename the "
                        f".kiln-state file away to continue from the LoRA's weights with a fresh optimizer.")
    return [f"{k} {saved[k]!r} → {now[k]!r}" for k in RESUMABLE_SETTINGS if k in saved and saved[k] != now[k]]


def train(network: LoRANetwork, objective, forward: Callable, conditioning: Callable[..., dict],
          cache: LatentCache, latent_in: Callable[[torch.Tensor], torch.Tensor], cfg: TrainConfig,
          device: torch.device, checkpoint_blocks=(), on_step: Callable[[StepInfo], None] | None = None,
          on_save: Callable[[int, dict, "TrainResult"], None] | None = None, resume: dict | None = None) -> TrainResult:
    """Train ``network`` (already attached to the frozen host network) for ``cfg.steps`` optimizer steps.

    Every ``cfg.save_every`` steps ``on_save(step, state, result)`` gets the training state (optimizer,
    schedule, every RNG, the batch position); passing such a state back as ``resume`` (with the adapters
    loaded from the LoRA saved at that step) continues exactly where that run was."""
    if not cache.samples:
        raise KilnError("the cached dataset is empty: nothing to train on.")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    network.to(device=device, dtype=torch.float32).train()
    params = [p for p in network.parameters() if p.requires_grad]
    if cache.has_masks and all(s.mask is not None and not bool((s.mask > 0).any()) for s in cache.samples):
        raise KilnError("every mask is entirely black, so nothing would train: white = train, black = ignore. "
                        "Check the mask folder or alpha channels, or set Alpha/Mask Source's mode to none.")
    groups = network.param_groups(cfg.learning_rate, cfg.group_lrs)
    group_lr = {g["name"]: g["lr"] for g in groups}
    opt = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay)
    sched = build_scheduler(opt, cfg.lr_scheduler, cfg.steps, cfg.warmup_steps)
    if hasattr(opt, "train"):
        opt.train()  # schedule-free optimizers keep separate train/eval weights
    autocast_dtype = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    flip_rng = random.Random(cfg.seed + 3)  # flip_aug: each drawn sample is mirrored with p = 0.5, seeded

    def batch_tensors(indices, train, epoch, caption_rng):
        samples = [cache.samples[i] for i in indices]
        flips = [train and flip_rng.random() < 0.5 for _ in samples]  # the probe is never mirrored
        views = [s.view(f) for s, f in zip(samples, flips)]
        geometries = [s.drawn_geometry(f) for s, f in zip(samples, flips)]  # SDXL's size/crop conditioning
        x0 = latent_in(torch.stack([latent for latent, _ in views]).to(device))
        masks = [m for _, m in views]
        mask = torch.stack(masks).to(device) if all(m is not None for m in masks) else None
        weights = torch.tensor([cfg.prior_loss_weight if s.is_reg else 1.0 for s in samples], device=device)
        # kohya's caption augmentation, drawn anew each time; the probe (train=False) sees the steady captions
        captions = [augment_caption(s.caption, s.captions, caption_rng, epoch) if train
                    else base_caption(s.caption, s.captions) for s in samples]
        cond = {k: v.to(device) for k, v in conditioning(captions, train=train, geometries=geometries).items()}
        return x0, mask, weights, cond

    def loss_of(indices, generator, train=True, epoch=1, caption_rng=None):
        x0, mask, weights, cond = batch_tensors(indices, train, epoch, caption_rng)
        nb = objective.sample(x0, generator)
        with autocast():
            pred = forward(nb.x_t, nb.timesteps, cond)
        err = elementwise(objective.output(pred, nb), nb.target, cfg.loss_type)
        per_sample = per_sample_loss(err, mask, cfg.mask_normalize)
        if nb.weight is not None:
            per_sample = per_sample * nb.weight.to(device)
        if cfg.min_snr_gamma:
            per_sample = per_sample * objective.min_snr_weight(nb.snr, cfg.min_snr_gamma).to(device)
        return (per_sample * weights).mean()

    # a fixed probe batch (same samples, noise and timesteps) measured before and after training
    probe = sorted(range(len(cache.samples)), key=lambda i: tuple(cache.samples[i].latent.shape))[:max(1, cfg.batch_size)]
    probe = [i for i in probe if cache.samples[i].latent.shape == cache.samples[probe[0]].latent.shape]

    def probe_loss() -> float:
        was_training = network.training
        network.eval()  # no dropout: before and after are measured the same way
        with torch.no_grad():
            loss = float(loss_of(probe, torch.Generator().manual_seed(cfg.seed + 1), train=False))
        network.train(was_training)
        return loss

    batches = BatchStream(cache, cfg.batch_size, cfg.seed)
    caption_rng = random.Random(cfg.seed + 2)  # its own stream: caption augmentation never moves batch order or noise
    if resume is None:
        result, first = TrainResult(probe_loss_start=probe_loss()), 1
    else:
        if resume["step"] >= cfg.steps:
            raise KilnError(f"the run to resume already made {resume['step']} steps; set steps above that to "
                            f"train on.")
        changed = changed_settings(resume.get("settings"), cfg)
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        # the restored state brings the old learning rates back: the requested ones (and schedule) take effect
        sched.base_lrs = [group_lr.get(g.get("name"), cfg.learning_rate) for g in opt.param_groups]
        for k, (g, base) in enumerate(zip(opt.param_groups, sched.base_lrs)):
            g["initial_lr"], g["lr"] = base, base * sched.lr_lambdas[k](sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        if scaler and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        caption_rng.setstate(resume["caption_rng"])
        flip_rng.setstate(resume["flip_rng"])
        batches.restore(resume["batches"])
        result = TrainResult(losses=list(resume["losses"]), steps=resume["step"],
                             probe_loss_start=resume["probe_loss_start"])
        first = resume["step"] + 1
        if changed:
            result.notes.append(f"resumed at step {resume['step']}, changed since the saved run: {', '.join(changed)}; "
                                f"they take effect from step {first}, so this is no longer exactly the run that stopped")
        else:
            result.notes.append(f"resuming exactly at step {resume['step']}")

    def state(step: int) -> dict:
        return {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "caption_rng": caption_rng.getstate(),
                "flip_rng": flip_rng.getstate(), "batches": batches.state(), "losses": list(result.losses),
                "probe_loss_start": result.probe_loss_start, "settings": run_settings(cfg)}

    initial = [p.detach().clone() for p in params]  # "nothing changed" is checked against these
    grads_checked = False

    start = time.perf_counter()
    with gradient_checkpointing(list(checkpoint_blocks), cfg.gradient_checkpointing):
        for step in range(first, cfg.steps + 1):
            total = 0.0
            for _ in range(cfg.grad_accum):
                epoch, indices = next(batches)
                loss = loss_of(indices, gen, epoch=epoch, caption_rng=caption_rng)
                if not torch.isfinite(loss):
                    raise KilnError(f"the loss became {loss.item()} at step {step}: lower the learning rate "
                                    f"(now {cfg.learning_rate:g}), or train in fp32/bf16 instead of fp16.")
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                total += loss.item() / cfg.grad_accum
            if not grads_checked and total > 0:  # a batch that counts (a black-masked one has loss 0 exactly)
                grads_checked = True
                if all(p.grad is None or not bool(p.grad.any()) for p in params):
                    raise KilnError(f"every trainable gradient is exactly zero at step {step} (loss {total:.4g}): "
                                    f"training would change nothing. Likely causes: {NO_CHANGE_CAUSES}.")
            if scaler:
                scaler.unscale_(opt)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if step == first and scaler is None and all(torch.equal(p, p0) for p, p0 in zip(params, initial)):
                raise KilnError(f"the first step changed no LoRA weight (learning rate {cfg.learning_rate:g}): training "
                                f"would change nothing. Likely causes: {NO_CHANGE_CAUSES}.")
            sched.step()
            opt.zero_grad(set_to_none=True)
            result.losses.append(total)
            result.steps = step
            result.seconds = time.perf_counter() - start
            if on_step:
                on_step(StepInfo(step, cfg.steps, total, sched.get_last_lr()[0], result.seconds))
            if on_save and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                on_save(step, state(step), result)
    if hasattr(opt, "eval"):
        opt.eval()
    network.eval()
    if all(torch.equal(p, p0) for p, p0 in zip(params, initial)):
        raise KilnError(f"after {result.steps} steps the LoRA is bit-identical to its starting state: training changed "
                        f"nothing (learning rate {cfg.learning_rate:g}). Likely causes: {NO_CHANGE_CAUSES}.")
    result.probe_loss_end = probe_loss()
    return result
