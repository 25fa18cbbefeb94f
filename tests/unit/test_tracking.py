"""TensorBoard logging (kohya's logging_dir): the event files read back with TensorBoard's own reader hold kohya's
tags and values at the right steps; refusals name what to do."""
import io
import os
import sys

import pytest
from PIL import Image

from trainer_core.errors import KilnError
from trainer_core.training.loop import StepInfo
from trainer_core.report.tracking import TensorBoardLog

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read(path):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_and_samples_under_kohyas_tags_and_folder_layout(tmp_path):
    log = TensorBoardLog(str(tmp_path / "logs"), log_prefix="toy-", tracker_name=None)
    run, = os.listdir(tmp_path / "logs")
    assert run.startswith("toy-") and len(run) == len("toy-") + 14 and run[4:].isdigit()
    assert log.path == str(tmp_path / "logs" / run / "network_train")
    lrs = {"unet": 1e-4, "clip_l": 5e-5}
    losses = [0.5, 0.3, 0.4, 0.2]
    for step, loss in enumerate(losses, 1):
        log.step(StepInfo(step, 4, loss, 1e-4, 0.1 * step, epoch=(step + 1) // 2, epoch_end=step % 2 == 0,
                          val_loss=0.35 if step == 4 else None, lrs={k: v * step for k, v in lrs.items()}))
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))  # left half red
    log.image("step 4", image, 4)
    log.close()

    acc = read(log.path)
    scalars = {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert scalars["loss/current"] == [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.2)]
    # the mean over the epoch so far, restarting each epoch (kohya's LossRecorder)
    assert scalars["loss/average"] == [(1, 0.5), (2, 0.4), (3, 0.4), (4, 0.3)]
    assert scalars["lr/unet"] == [(s, round(1e-4 * s, 6)) for s in range(1, 5)]
    assert scalars["lr/clip_l"] == [(s, round(5e-5 * s, 6)) for s in range(1, 5)]
    assert scalars["loss/epoch_average"] == [(1, 0.4), (2, 0.3)]  # x = epoch, as kohya logs it
    assert scalars["epoch"] == [(2, 1.0), (4, 2.0)]
    assert scalars["loss/validation/step_average"] == [(4, 0.35)]
    img, = acc.Images("samples/step 4")
    assert img.step == 4 and (img.width, img.height) == (16, 8)
    back = Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB")
    assert back.getpixel((2, 2)) == (255, 0, 0) and back.getpixel((12, 2)) == (0, 0, 255)


def test_refusals_name_the_key_and_the_way_out(tmp_path, monkeypatch):
    with pytest.raises(KilnError, match=r"Train LoRA \(SD1\): log_with='wandb': Kiln logs to TensorBoard only"):
        TensorBoardLog(str(tmp_path), log_with="wandb", where="Train LoRA (SD1)")
    with pytest.raises(KilnError, match=r"log_with=tensorboard needs logging_dir"):
        TensorBoardLog("", log_with="tensorboard")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(KilnError, match=r"needs the tensorboard package.*pip install tensorboard"):
        TensorBoardLog(str(tmp_path))
