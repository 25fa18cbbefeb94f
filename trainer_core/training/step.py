"""One optimizer step: forward and backward over its batches, then clipping, the optimizer and schedule steps and
the EMA update; on the way, the checks that stop a run that would change nothing."""
from __future__ import annotations

import warnings

import torch

from . import distributed
from .batch_loss import StepInputs, batch_loss
from ..data.cache import LatentCache
from ..errors import KilnError
from ..lora import max_norm
from .run_state import RunState

NO_CHANGE_CAUSES = ("a model whose output does not depend on its input (e.g. a zero-initialised output layer), "
                    "a learning rate of 0, or masks that are all black")


def sampled(p: torch.Tensor, most: int = 4096) -> torch.Tensor:
    """Up to ``most`` evenly strided values of a parameter: enough to see that a step changed it (every value
    of a small LoRA matrix), without a second copy of a fully fine-tuned model."""
    flat = p.detach().flatten()
    return flat[::max(1, flat.numel() // most)].clone()


def unchanged(params: list, initial: list) -> bool:
    return all(torch.equal(sampled(p), p0) for p, p0 in zip(params, initial))


class ChangeGuard:
    """Stops a run that would change nothing as soon as that shows: at the first step whose loss counts (every
    gradient exactly zero), after the first step that should move the weights, and at the end."""

    def __init__(self, params: list, fused: bool):
        self.params = params
        self.initial = [sampled(p) for p in params]
        self.grads_checked = fused  # fused: each gradient is freed as soon as its parameter stepped
        self.change_checked = False

    def check_gradients(self, step: int, loss: float) -> None:
        if self.grads_checked or not loss > 0:  # a black-masked batch has loss 0 exactly: it does not count
            return
        self.grads_checked = True
        if all(p.grad is None or not bool(p.grad.any()) for p in self.params):
            raise KilnError(f"every trainable gradient is exactly zero at step {step} (loss {loss:.4g}): "
                            f"training would change nothing. Likely causes: {NO_CHANGE_CAUSES}.")

    def check_first_change(self, learning_rate: float) -> None:
        """After a step that must have moved the weights (not fp16's, which may skip; not at warm-up's lr 0)."""
        if self.change_checked:
            return
        self.change_checked = True
        if unchanged(self.params, self.initial):
            raise KilnError(f"the first step changed no LoRA weight (learning rate {learning_rate:g}): "
                            f"training would change nothing. Likely causes: {NO_CHANGE_CAUSES}.")

    def check_end(self, steps: int, learning_rate: float) -> None:
        if unchanged(self.params, self.initial):
            raise KilnError(f"after {steps} steps the LoRA is bit-identical to its starting state: training changed "
                            f"nothing (learning rate {learning_rate:g}). Likely causes: {NO_CHANGE_CAUSES}.")


def freeze_text_encoders(groups: list[dict]) -> None:
    """kohya's stop_text_encoder_training: every group that is not the UNet's stops training (no gradient, no
    optimizer step, weight decay included) from this step on."""
    for g in groups:
        if not g["name"].startswith("unet"):
            for p in g["params"]:
                p.requires_grad_(False)
                p.grad = None


def accumulate(inputs: StepInputs, run: RunState, source: LatentCache, step: int) -> tuple[float, int]:
    """Forward and backward over the step's batches: ``grad_accum`` of them, fewer when the epoch ends first (an
    optimizer step never spans two epochs, as kohya's). Returns (the step's loss, averaged over ranks; its epoch)."""
    cfg, batches, scaler = inputs.cfg, run.batches, run.scaler
    total = 0.0
    n = min(cfg.grad_accum, batches.left_in_epoch())
    for _ in range(n):
        epoch, indices = next(batches)
        part = batches.share(indices)
        loss = batch_loss(inputs, source, indices, run.gen, epoch=epoch, caption_rng=run.caption_rng, part=part)
        if loss is None:  # this rank's share of a short last batch is empty
            continue
        if not torch.isfinite(loss):
            raise KilnError(f"the loss became {loss.item()} at step {step}: lower the learning rate "
                            f"(now {cfg.learning_rate:g}), or train in fp32/bf16 instead of fp16.")
        # the batch's mean loss is Σ over ranks of (own mean × own share); averaging gradients divides by world
        weight = run.world * (part.stop - part.start) / len(indices)
        scaled = (loss * weight if weight != 1 else loss) / n
        (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.item() * weight / n
    return distributed.average_gradients(run.params, total), epoch  # no-op in a single process


def top_lr(opt: torch.optim.Optimizer) -> float | None:
    """The highest group learning rate (None: Adafactor's relative steps set their own)."""
    return max((g["lr"] for g in opt.param_groups), key=lambda v: -1 if v is None else v)


def optimizer_step(run: RunState, guard: ChangeGuard, step: int, loss: float, network) -> tuple | None:
    """Everything after the gradients of ``step`` are in (under fused_backward_pass every weight already stepped
    during backward). Returns scale_weight_norms' figures (modules scaled, mean norm, largest) when it is on."""
    cfg, opt, sched, scaler = run.cfg, run.opt, run.sched, run.scaler
    lr_now = top_lr(opt)  # the rate this step ran at
    guard.check_gradients(step, loss)
    if scaler:
        scaler.unscale_(opt)
    if cfg.optim.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.max_grad_norm)
    if scaler:
        scaler.step(opt)
        scaler.update()
    elif not run.fused:
        opt.step()
    warming_up = lr_now == 0 and any(b for b in sched.base_lrs)  # kohya's warmup starts at lr 0
    if scaler is None and not warming_up:
        guard.check_first_change(cfg.learning_rate)
    with warnings.catch_warnings():
        if run.fused:  # the main optimizer only holds the rates: torch warns that it was never stepped
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        sched.step()
    opt.zero_grad(set_to_none=True)
    norms = max_norm.apply(network, cfg.optim.scale_weight_norms) if cfg.optim.scale_weight_norms else None
    if run.ema is not None:
        run.ema.update(step)
    return norms


def lrs_by_group(run: RunState) -> dict:
    """The learning rate of each optimizer group by name, as the schedule last set it."""
    return {g.get("name") or f"group{k}": lr
            for k, (g, lr) in enumerate(zip(run.opt.param_groups, run.sched.get_last_lr()))}
