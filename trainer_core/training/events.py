"""When a run validates, saves and draws a preview: one rule each, asked by the loop as it runs and by the Train
node's clock (its ETA) when it plans the run ahead, so the two never disagree."""
from __future__ import annotations

from typing import Callable

from .config import TrainConfig


def validation_due(cfg: TrainConfig, step: int, epoch: int, epoch_end: bool) -> bool:
    """Every validate_every_n_steps steps, and at the end of every validate_every_n_epochs-th epoch (default 1)."""
    return bool((cfg.validation.validate_every_n_steps and step % cfg.validation.validate_every_n_steps == 0) or
                (epoch_end and epoch % (cfg.validation.validate_every_n_epochs or 1) == 0))


def saves_due(cfg: TrainConfig, step: int, epoch: int, epoch_end: bool, num_epochs: int) -> tuple[bool, int | None]:
    """(a step save is due, the epoch whose end is saved now or None), as kohya saves: every save_every_n_steps-th
    step, the last one included (NAME-step00000008 beside NAME, the run's output), and the end of every
    save_every_n_epochs-th epoch but the last, which is the output."""
    every_epochs = cfg.saving.save_every_n_epochs
    save_epoch = epoch if (epoch_end and every_epochs and epoch % every_epochs == 0 and epoch < num_epochs) else None
    return bool(cfg.save_every and step % cfg.save_every == 0), save_epoch


def preview_due(cfg: TrainConfig, every: int, step: int, epoch: int, epoch_end: bool) -> bool:
    """A preview every ``every`` steps, or at the end of every sample_every_n_epochs-th epoch (kohya's epoch option
    overrides the step one); never after the last step, whose preview the node draws from the final weights."""
    by_epoch = cfg.samples.sample_every_n_epochs
    due = (epoch_end and epoch % by_epoch == 0) if by_epoch else bool(every and step % every == 0)
    return due and step < cfg.steps


def planned(due: Callable[[int, int, bool], bool], total: int, per_epoch: int) -> list[int]:
    """The steps of a ``total``-step run of ``per_epoch`` optimizer steps per epoch at which ``due(step, epoch,
    epoch_end)`` holds, asked the way the loop asks it."""
    return [step for step in range(1, total + 1)
            if due(step, (step - 1) // per_epoch + 1, step % per_epoch == 0 or step == total)]


def planned_saves(cfg: TrainConfig, per_epoch: int) -> list[int]:
    """The steps after which the run writes an intermediate save (step or epoch)."""
    num_epochs = -(-cfg.steps // per_epoch)

    def due(step: int, epoch: int, epoch_end: bool) -> bool:
        save_step, save_epoch = saves_due(cfg, step, epoch, epoch_end, num_epochs)
        return save_step or save_epoch is not None
    return planned(due, cfg.steps, per_epoch)


def planned_previews(cfg: TrainConfig, every: int, per_epoch: int) -> list[int]:
    """The steps after which a preview is drawn during training (the final one comes after the last step)."""
    return planned(lambda s, e, end: preview_due(cfg, every, s, e, end), cfg.steps, per_epoch)
