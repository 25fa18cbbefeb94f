"""A Train node with kohya's logging_dir writes TensorBoard events a user's TensorBoard reads: the losses the node
reported, the learning rate of each optimizer group, and the sample previews."""
from __future__ import annotations

import pytest

from test_train_sd1 import TRAIN, load_and_cache

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_train_node_logs_losses_rates_and_samples_to_tensorboard(comfy, sd1_checkpoint, dataset_dir, tmp_path):
    model, clip, cached = load_and_cache(comfy, sd1_checkpoint, dataset_dir)
    cfg = comfy.run_node("KilnLoraConfig", rank=4, alpha=4.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    comfy.events.clear()
    comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=cfg,
                   **(TRAIN | dict(steps=3, sample_every=2, sample_steps=1, lr_scheduler="linear")),
                   text_encoder_lr=1e-3, training_args=f"logging_dir={tmp_path / 'logs'}\nlog_prefix=toy-")
    runs = list((tmp_path / "logs").glob("toy-*/network_train"))
    assert len(runs) == 1, list((tmp_path / "logs").rglob("*"))
    acc = event_accumulator.EventAccumulator(str(runs[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    reported = [e for name, e in comfy.events if name == "kiln.loss"]
    logged = acc.Scalars("loss/current")
    assert [e.step for e in logged] == [r["step"] for r in reported] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in reported], rel=1e-6)
    # one curve per optimizer group: the UNet's at the node's rate, CLIP-L's at text_encoder_lr, both decaying
    unet, te = ([e.value for e in acc.Scalars(f"lr/{g}")] for g in ("unet", "clip_l"))
    assert unet[0] < TRAIN["learning_rate"] and unet == sorted(unet, reverse=True)
    assert te == pytest.approx([v * 1e-3 / TRAIN["learning_rate"] for v in unet], rel=1e-5)
    # the preview shown at step 2 (sample_every) and the final sample the node outputs
    assert sorted(acc.Tags()["images"]) == ["samples/final", "samples/step 2"]
    assert [i.step for i in acc.Images("samples/step 2")] == [2] and [i.step for i in acc.Images("samples/final")] == [3]
