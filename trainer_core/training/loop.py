"""The training loop: one function to read top to bottom (nanoGPT-style).

Everything host-specific comes in as plain callables: ``forward`` runs the frozen network (with the LoRA adapters
attached) and ``conditioning(captions, train=..., geometries=...)`` turns captions into its conditioning tensors
(batch_loss.StepInputs says more). What the loop relies on is in modules of their own: contracts.py (what a
trainable network and a family's objective provide), run_state.py (what a saved state is made of), batch_loss.py
(the loss of a batch), eval_loss.py (probe and validation losses) and step.py (one optimizer step).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import distributed, validation
from .batch_loss import StepInputs
from .config import TrainConfig
from ..data.cache import LatentCache
from ..memory.checkpointing import gradient_checkpointing
from .contracts import Objective, TrainableNetwork
from ..maths.ema import EMA
from .epochs import BatchStream, epoch_batches, resolve_epochs, steps_per_epoch
from .events import saves_due, validation_due
from ..errors import KilnError
from .eval_loss import optimizer_mode, probe_batch, probe_loss, validation_loss
from ..lora import max_norm
from ..memory.oom import oom_guard
from ..maths.optim import FusedBackward, build_optimizer, build_scheduler, check_fused
from .run_state import RESUMABLE_SETTINGS, RunState, TrainResult, changed_settings, run_settings
from .step import ChangeGuard, accumulate, freeze_text_encoders, lrs_by_group, optimizer_step

# what other modules import from the loop (some now defined beside it)
__all__ = ["PRECISIONS", "TrainConfig", "StepInfo", "TrainResult", "BatchStream", "epoch_batches", "RESUMABLE_SETTINGS",
           "run_settings", "changed_settings", "train"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    seconds: float
    epoch: int = 1
    epoch_end: bool = False   # this step finished an epoch
    val_loss: float | None = None  # the validation loss measured after this step, if any
    lrs: dict | None = None        # learning rate per optimizer group name (tracking.py logs them)
    averaged: Callable = contextlib.nullcontext  # a preview inside ``with info.averaged():`` shows the EMA weights
    saving: bool = False           # on_save writes an intermediate save right after this step (the chart marks it)


def check_trainable(network: TrainableNetwork, cache: LatentCache, cfg: TrainConfig, world: int) -> None:
    """Settings and data that cannot train as asked stop the run before anything is built."""
    if world > 1 and cfg.optim.fused_backward_pass:
        raise KilnError(f"fused_backward_pass steps each parameter during backward, before the other {world - 1} "
                        f"process(es) have sent their gradients: turn it off for a multi-process (torchrun) run.")
    if cache.has_masks and all(s.mask is not None and not bool((s.mask > 0).any()) for s in cache.samples):
        raise KilnError("every mask is entirely black, so nothing would train: white = train, black = ignore. "
                        "Check the mask folder or alpha channels, or set Alpha/Mask Source's mode to none.")
    if cfg.preservation.diff_output_preservation and not network.switchable:
        raise KilnError("diff_output_preservation compares with the model without its adapters, and full "
                        "fine-tuning (DreamBooth) has none: use regularization images (prior_loss_weight) instead.")
    if cfg.preservation.diff_output_preservation and not cfg.preservation_pairs:
        raise KilnError("diff_output_preservation: no trigger → class pairs were given.")
    if cfg.optim.scale_weight_norms:
        max_norm.check(network, cfg.optim.scale_weight_norms)


def train(network: TrainableNetwork, objective: Objective, forward: Callable, conditioning: Callable[..., dict],
          cache: LatentCache, latent_in: Callable[[torch.Tensor], torch.Tensor], cfg: TrainConfig,
          device: torch.device, checkpoint_blocks=(), on_step: Callable[[StepInfo], None] | None = None,
          on_save: Callable[..., None] | None = None, resume: dict | None = None) -> TrainResult:
    """Train ``network`` (already attached to the frozen host network) for ``cfg.steps`` optimizer steps
    (``cfg.max_train_epochs`` epochs when set). An optimizer step never spans two epochs (kohya's
    accumulation ends with the epoch's last batch).

    Every ``cfg.save_every`` steps ``on_save(step, state, result)`` gets the training state
    (optimizer, schedule, every RNG, the batch position), and at the end of every ``cfg.saving.save_every_n_epochs``-th
    epoch ``on_save(step, state, result, epoch=N)``; passing such a state back as ``resume`` (with the adapters
    loaded from the LoRA saved then) continues exactly where that run was."""
    if not cache.samples:
        raise KilnError("the cached dataset is empty: nothing to train on.")
    cache, val_cache = validation.parts(cache, cfg)
    resolve_epochs(cfg, cache)
    num_epochs = math.ceil(cfg.steps / steps_per_epoch(cache, cfg.batch_size, cfg.grad_accum))
    torch.manual_seed(cfg.seed)
    distributed.split_torch_rng()
    network.to(device=device, dtype=torch.float32).train()
    params = [p for p in network.parameters() if p.requires_grad]
    world = distributed.world()
    check_trainable(network, cache, cfg, world)
    distributed.broadcast_(params)  # the same start on every rank

    # the optimizer, its schedule, the average and the random streams: the run's state
    groups = network.param_groups(cfg.learning_rate, cfg.group_lrs)
    requested_lrs = {g["name"]: g["lr"] for g in groups}  # before the schedule scales them
    opt = build_optimizer(cfg.optimizer_name, groups, cfg.learning_rate, cfg.optim.optimizer_args)
    sched = build_scheduler(opt, cfg.lr_schedule(), cfg.steps, cfg.learning_rate)
    fused = None
    if cfg.optim.fused_backward_pass:
        check_fused(cfg.grad_accum, cfg.optim.max_grad_norm, cfg.precision)
        fused = FusedBackward(opt, cfg.optimizer_name, cfg.optim.optimizer_args)
    e = cfg.ema
    ema = EMA(params, e.ema_decay, e.ema_update_every, e.ema_warmup, e.ema_on_host) if e.ema_decay else None
    averaged = ema.applied if ema else contextlib.nullcontext  # what saves, previews and validation see
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    run = RunState.start(cfg, cache, params, opt, sched, fused, scaler, ema, requested_lrs, world)
    optimizer_mode(run.stepping, train=True)
    inputs = StepInputs(network, objective, forward, conditioning, latent_in, cfg, device, PRECISIONS[cfg.precision],
                        run.flip_rng)

    # a fresh run measures its probe batch first; a resumed one takes up the saved state
    probe = probe_batch(cache, cfg.batch_size)  # measured before and after training, the same way
    trained_params = sum(p.numel() for p in params)
    if resume is None:
        with oom_guard(cfg, trained_params, device, "measuring the probe loss before step 1"):
            run.result = TrainResult(probe_loss_start=probe_loss(inputs, cache, probe))
    else:
        run.restore(resume)
    result = run.result
    guard = ChangeGuard(params, fused is not None)  # "nothing changed" is checked against the weights now
    max_val = cfg.validation.max_validation_steps
    val_batches = validation.batches(val_cache, cfg.batch_size, max_val) if val_cache else []
    val_timesteps = validation.timesteps(cfg.noise.min_timestep, cfg.noise.max_timestep, objective.num_timesteps)

    start, norms = time.perf_counter(), None
    memory = cfg.memory
    with oom_guard(cfg, trained_params, device, lambda: f"at training step {result.steps + 1}"), \
            gradient_checkpointing(list(checkpoint_blocks), memory.gradient_checkpointing,
                                   memory.cpu_offload_checkpointing):
        for step in range(result.steps + 1, cfg.steps + 1):
            if cfg.stop_text_encoder_training is not None and step > cfg.stop_text_encoder_training:
                freeze_text_encoders(groups)
            loss, epoch = accumulate(inputs, run, cache, step)
            epoch_end = run.batches.epoch_ended
            norms = optimizer_step(run, guard, step, loss, network)
            result.losses.append(loss)
            result.steps = step
            val_loss = None
            if val_batches and validation_due(cfg, step, epoch, epoch_end):
                with averaged():  # the loss of what the run would give now
                    val_loss = validation_loss(inputs, val_cache, val_batches, val_timesteps, run.stepping)
                result.validation.append((step, val_loss))
            result.seconds = time.perf_counter() - start
            result.lrs.append((step, sched.get_last_lr()[0]))
            save_step, save_epoch = saves_due(cfg, step, epoch, epoch_end, num_epochs)
            saving = bool(on_save and (save_step or save_epoch))
            if saving:
                result.saves.append(step)
            if on_step:
                on_step(StepInfo(step, cfg.steps, loss, sched.get_last_lr()[0], result.seconds, epoch, epoch_end,
                                 val_loss, lrs_by_group(run), averaged, saving))
            if saving and save_step:
                state = run.capture(step)
                with averaged():  # the file holds what the run would give now; the state, the trained values
                    on_save(step, state, result)
            if saving and save_epoch:
                state = run.capture(step)
                with averaged():
                    on_save(step, state, result, epoch=save_epoch)
    optimizer_mode(run.stepping, train=False)
    if fused:
        fused.remove()
    network.eval()
    guard.check_end(result.steps, cfg.learning_rate)
    if norms is not None:  # kohya logs these per step
        result.notes.append(f"scale_weight_norms {cfg.optim.scale_weight_norms:g}: at the last step {norms[0]} "
                            f"modules scaled back; mean norm {norms[1]:.4g}, largest {norms[2]:.4g}")
    if ema is not None:
        ema.copy_to_params()
    result.probe_loss_end = probe_loss(inputs, cache, probe)
    return result
