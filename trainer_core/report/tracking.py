"""kohya's ``logging_dir`` / ``log_prefix`` / ``log_with`` / ``log_tracker_name``: the training curve and sample
images written as TensorBoard event files, under the tags kohya's trainers log, so a kohya user's TensorBoard
set-up reads a Kiln run the same way.

Where the files go (kohya's prepare_accelerator + accelerate's TensorBoard tracker):
``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name or "network_train">``.
Tags: ``loss/current`` and ``loss/average`` (the mean over the epoch so far, kohya's LossRecorder) at every
step, ``lr/<group>`` for each optimizer group (Kiln's group names: ``unet``, ``clip_l``, ``clip_g``, ``t5xxl``,
block labels, `` plus`` for LoRA+), ``loss/validation/step_average`` where a validation loss was measured,
``loss/epoch_average`` and ``epoch`` at the end of each epoch (x = epoch, as kohya logs them), and sample images
under ``samples/<name>`` (kohya sends those to wandb only). The writer is torch.utils.tensorboard's, which needs
the ``tensorboard`` package; it is imported only when logging_dir is set.
"""
from __future__ import annotations

import contextlib
import os
import time

from ..training import distributed
from ..errors import KilnError

BACKENDS = ("tensorboard", "wandb", "all")
PIP = "pip install tensorboard   (or: pip install comfyui-kiln[tensorboard])"


class TensorBoardLog:
    def __init__(self, logging_dir: str, log_prefix: str | None = None, log_with: str | None = None,
                 tracker_name: str | None = None, default_tracker: str = "network_train", where: str = "training_args"):
        if log_with not in (None, "", "tensorboard"):
            raise KilnError(f"{where}: log_with={log_with!r}: Kiln logs to TensorBoard only (wandb needs an account "
                            f"and the network); use log_with=tensorboard or leave it unset.")
        if not logging_dir:
            raise KilnError(f"{where}: log_with=tensorboard needs logging_dir (the folder for the event files), "
                            f"as in kohya.")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KilnError(f"{where}: logging_dir needs the tensorboard package, which is not installed in "
                            f"ComfyUI's Python: {PIP}") from None
        run = f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime())}"
        self.path = os.path.join(logging_dir, run, tracker_name or default_tracker)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise KilnError(f"{where}: cannot create logging_dir {self.path}: {e.strerror or e}") from None
        self.writer = SummaryWriter(self.path)
        self.epoch_losses: list[float] = []

    def step(self, info) -> None:
        """One optimizer step (a loop.StepInfo)."""
        w = self.writer
        self.epoch_losses.append(info.loss)
        w.add_scalar("loss/current", info.loss, info.step)
        w.add_scalar("loss/average", sum(self.epoch_losses) / len(self.epoch_losses), info.step)
        for group, lr in (info.lrs or {"unet": info.lr}).items():
            w.add_scalar(f"lr/{group}", lr, info.step)
        if info.val_loss is not None:
            w.add_scalar("loss/validation/step_average", info.val_loss, info.step)
        if info.epoch_end:
            w.add_scalar("loss/epoch_average", sum(self.epoch_losses) / len(self.epoch_losses), info.epoch)
            w.add_scalar("epoch", info.epoch, info.step)
            self.epoch_losses = []
        w.flush()

    def image(self, name: str, picture, step: int) -> None:
        """A sample preview (a PIL image, as the Train nodes render them)."""
        import numpy as np

        self.writer.add_image(f"samples/{name}", np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def tensorboard_log(cfg, where: str):
    """A TensorBoardLog for a run whose TrainConfig sets logging_dir or log_with (else None), closed afterwards."""
    lg = cfg.logging
    log = (TensorBoardLog(lg.logging_dir, lg.log_prefix, lg.log_with, lg.log_tracker_name, where=where)
           if (lg.logging_dir or lg.log_with) and distributed.is_main() else None)  # one log: rank 0's
    try:
        yield log
    finally:
        if log is not None:
            log.close()
