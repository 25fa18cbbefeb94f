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
from ..data.cache import LatentCache
from ..memory.checkpointing import gradient_checkpointing
from .contracts import Objective, TrainableNetwork
from ..maths.ema import EMA
from .epochs import BatchStream, epoch_batches, resolve_epochs, steps_per_epoch
from ..errors import KilnError
from .eval_loss import optimizer_mode, probe_batch, probe_loss, validation_loss
from ..lora import max_norm
from ..memory.oom import oom_guard
from ..maths.optim import FusedBackward, Schedule, build_optimizer, build_scheduler, check_fused
from .run_state import RESUMABLE_SETTINGS, RunState, TrainResult, changed_settings, run_settings
from .step import ChangeGuard, accumulate, freeze_text_encoders, lrs_by_group, optimizer_step

# what other modules import from the loop (some now defined beside it)
__all__ = ["PRECISIONS", "TrainConfig", "StepInfo", "TrainResult", "BatchStream", "epoch_batches", "RESUMABLE_SETTINGS",
           "run_settings", "changed_settings", "train"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "AdamW"
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
    # kohya's training_args (trainer_core/options/training_args.py), same names and meaning
    max_train_epochs: int | None = None            # sets steps (epochs.steps_per_epoch)
    save_every_n_epochs: int | None = None         # on_save(..., epoch=N) at the end of every Nth epoch
    save_last_n_epochs: int | None = None          # read by the host that writes the files (epochs.py rules)
    save_last_n_steps: int | None = None
    sample_every_n_epochs: int | None = None       # read by the host's on_step (StepInfo.epoch_end)
    # noise and timesteps: read when the host builds the objective (noise.NoiseOptions.from_config)
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    optimizer_type: str = ""                       # overrides optimizer (a kohya name or a class path)
    optimizer_args: dict | None = None
    lr_warmup_steps: float | None = None           # overrides warmup_steps; < 1 = fraction of all steps
    lr_decay_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str = ""
    lr_scheduler_args: dict | None = None
    fused_backward_pass: bool = False              # optim.FusedBackward: step each parameter during backward
    stop_text_encoder_training: int | None = None  # kohya (train_db): text encoders train in steps 1..N only
    validation_split: float | None = None          # validation.py: held-out images, fixed timesteps and noise
    validation_seed: int | None = None             # (default: seed)
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None     # None: every epoch (when there is a validation part)
    max_validation_steps: int | None = None
    logging_dir: str | None = None                 # tracking.py, read by the host: TensorBoard event files
    log_prefix: str | None = None
    log_with: str | None = None
    log_tracker_name: str | None = None
    max_token_length: int | None = None            # read by the host's text conditioning (kohya's windows)
    clip_skip: int | None = None                   # read by the host: the CLIP layer it encodes with
    sample_sampler: str | None = None              # read by the host's previews (sample_prompts.SAMPLERS)
    sample_at_first: bool = False
    ema_decay: float = 0.0                         # ema.py: 0 = off; saves, previews and the result use the average
    ema_update_every: int = 1
    ema_warmup: bool = True
    ema_on_host: bool = False
    diff_output_preservation: bool = False         # preservation.py: keep the class prompt's prediction at the base's
    diff_output_preservation_multiplier: float = 1.0
    diff_output_preservation_trigger: str = ""
    diff_output_preservation_class: str = ""
    preservation_pairs: list = field(default_factory=list)  # (trigger, class), set by the host (preservation.pairs_from)
    blocks_to_swap: int = 0                        # block_swap.py: the last N checkpoint blocks live in host memory
    cpu_offload_checkpointing: bool = False        # checkpointing.py: checkpointed blocks' inputs kept on the host
    fp8_base: bool = False                         # read by the host: the MODEL's weights must be fp8 (ComfyUI loads them)
    fp8_base_unet: bool = False
    training_args: dict = field(default_factory=dict)  # the training_args given (for the node's text)
    session_id: int = 0                            # kohya's ss_session_id / ss_training_started_at (set by the host)
    training_started_at: float = 0.0

    @property
    def optimizer_name(self) -> str:
        return self.optimizer_type or self.optimizer

    def schedule(self) -> Schedule:
        warmup = self.warmup_steps if self.lr_warmup_steps is None else self.lr_warmup_steps
        return Schedule(self.lr_scheduler, warmup, self.lr_decay_steps, self.lr_scheduler_num_cycles,
                        self.lr_scheduler_power, self.lr_scheduler_min_lr_ratio, self.lr_scheduler_type,
                        self.lr_scheduler_args or {})
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    scale_weight_norms: float | None = None         # lora/max_norm.py: kohya's max-norm regularisation


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
    if world > 1 and cfg.fused_backward_pass:
        raise KilnError(f"fused_backward_pass steps each parameter during backward, before the other {world - 1} "
                        f"process(es) have sent their gradients: turn it off for a multi-process (torchrun) run.")
    if cache.has_masks and all(s.mask is not None and not bool((s.mask > 0).any()) for s in cache.samples):
        raise KilnError("every mask is entirely black, so nothing would train: white = train, black = ignore. "
                        "Check the mask folder or alpha channels, or set Alpha/Mask Source's mode to none.")
    if cfg.diff_output_preservation and not network.switchable:
        raise KilnError("diff_output_preservation compares with the model without its adapters, and full "
                        "fine-tuning (DreamBooth) has none: use regularization images (prior_loss_weight) instead.")
    if cfg.diff_output_preservation and not cfg.preservation_pairs:
        raise KilnError("diff_output_preservation: no trigger → class pairs were given.")
    if cfg.scale_weight_norms:
        max_norm.check(network, cfg.scale_weight_norms)


def validation_due(cfg: TrainConfig, step: int, epoch: int, epoch_end: bool) -> bool:
    """Every validate_every_n_steps steps, and at the end of every validate_every_n_epochs-th epoch (default 1)."""
    return bool((cfg.validate_every_n_steps and step % cfg.validate_every_n_steps == 0) or
                (epoch_end and epoch % (cfg.validate_every_n_epochs or 1) == 0))


def saves_due(cfg: TrainConfig, step: int, epoch: int, epoch_end: bool, num_epochs: int) -> tuple[bool, int | None]:
    """(a step save is due, the epoch whose end is saved now or None); the last epoch's end is the run's output."""
    save_epoch = epoch if (epoch_end and cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0
                           and epoch < num_epochs) else None
    return bool(cfg.save_every and step % cfg.save_every == 0), save_epoch


def train(network: TrainableNetwork, objective: Objective, forward: Callable, conditioning: Callable[..., dict],
          cache: LatentCache, latent_in: Callable[[torch.Tensor], torch.Tensor], cfg: TrainConfig,
          device: torch.device, checkpoint_blocks=(), on_step: Callable[[StepInfo], None] | None = None,
          on_save: Callable[..., None] | None = None, resume: dict | None = None) -> TrainResult:
    """Train ``network`` (already attached to the frozen host network) for ``cfg.steps`` optimizer steps
    (``cfg.max_train_epochs`` epochs when set). An optimizer step never spans two epochs (kohya's
    accumulation ends with the epoch's last batch).

    Every ``cfg.save_every`` steps ``on_save(step, state, result)`` gets the training state
    (optimizer, schedule, every RNG, the batch position), and at the end of every ``cfg.save_every_n_epochs``-th
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
    opt = build_optimizer(cfg.optimizer_name, groups, cfg.learning_rate, cfg.optimizer_args)
    sched = build_scheduler(opt, cfg.schedule(), cfg.steps, cfg.learning_rate)
    fused = None
    if cfg.fused_backward_pass:
        check_fused(cfg.grad_accum, cfg.max_grad_norm, cfg.precision)
        fused = FusedBackward(opt, cfg.optimizer_name, cfg.optimizer_args)
    ema = EMA(params, cfg.ema_decay, cfg.ema_update_every, cfg.ema_warmup, cfg.ema_on_host) if cfg.ema_decay else None
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
    val_batches = validation.batches(val_cache, cfg.batch_size, cfg.max_validation_steps) if val_cache else []
    val_timesteps = validation.timesteps(cfg.min_timestep, cfg.max_timestep, objective.num_timesteps)

    start, norms = time.perf_counter(), None
    with oom_guard(cfg, trained_params, device, lambda: f"at training step {result.steps + 1}"), \
            gradient_checkpointing(list(checkpoint_blocks), cfg.gradient_checkpointing, cfg.cpu_offload_checkpointing):
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
            saving = bool(on_save and step < cfg.steps and (save_step or save_epoch))
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
        result.notes.append(f"scale_weight_norms {cfg.scale_weight_norms:g}: at the last step {norms[0]} modules scaled "
                            f"back; mean norm {norms[1]:.4g}, largest {norms[2]:.4g}")
    if ema is not None:
        ema.copy_to_params()
    result.probe_loss_end = probe_loss(inputs, cache, probe)
    return result
