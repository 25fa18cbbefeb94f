"""Errors a user can act on, and Cancel, through ComfyUI's own execution path."""
from __future__ import annotations

import pytest
import torch

from fixtures.datasets import make_empty_dataset, write_corrupt_image
from fixtures.kiln_nodes import DATASET, kiln_error

TRAIN = dict(learning_rate=1e-3, optimizer="AdamW", lr_scheduler="constant", warmup_steps=0, grad_accum=1,
             max_grad_norm=1.0, seed=0, precision="fp32", gradient_checkpointing=False, loss_type="l2",
             min_snr_gamma=0.0, mask_normalize=False, prior_loss_weight=1.0, sample_prompts="", sample_every=0,
             sample_steps=1, sample_cfg=1.0)


def test_empty_and_missing_dataset_folders(comfy, tmp_path):
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnLoadDataset", folder=str(make_empty_dataset(tmp_path / "empty")), **DATASET)
    assert "no images" in kiln_error(e) and "N_name" in str(e.value)
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnLoadDataset", folder=str(tmp_path / "does-not-exist"), **DATASET)
    assert "folder not found" in kiln_error(e) and "does-not-exist" in str(e.value)


def test_unreadable_image_is_named(comfy, tmp_path):
    folder = tmp_path / "ds" / "3_thing"
    folder.mkdir(parents=True)
    write_corrupt_image(folder / "broken.png")
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnLoadDataset", folder=str(tmp_path / "ds"), **DATASET)
    assert "broken.png" in kiln_error(e)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs_lora", "kiln/../../escape", "a/../../../etc/x"])
def test_save_lora_refuses_names_outside_models_loras(comfy, name):
    lora_io = __import__(comfy.node_class("KilnSaveLora").__module__.rsplit(".", 2)[0] + ".trainer_core.lora.io",
                         fromlist=["TrainedLora"])
    lora = lora_io.TrainedLora({"x.alpha": torch.tensor(1.0)}, {}, "SD15")
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnSaveLora", lora=lora, filename=name, precision="fp16", overwrite=True)
    assert "outside models/loras" in kiln_error(e)
    assert not any(comfy.loras_dir.parent.parent.rglob("escape*"))


@pytest.mark.slow
@pytest.mark.parametrize("text_encoder_lr", [0.0, 1e-4], ids=["unet", "unet+text_encoder"])
def test_cancel_stops_within_one_step_and_restores_the_model(comfy, sd1_checkpoint, dataset_dir, text_encoder_lr):
    import importlib
    mm = importlib.import_module("comfy.model_management")
    cutils = importlib.import_module("comfy.utils")

    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **DATASET)[0]
    ds = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    cfg = comfy.run_node("KilnLoraConfig", rank=2, alpha=2.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    seen = []
    previous_hook = cutils.PROGRESS_BAR_HOOK

    def cancel_at_3(value, total, preview=None, prompt_id=None, node_id=None):
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)  # what the Cancel button / POST /interrupt does
    cutils.set_progress_bar_global_hook(cancel_at_3)
    params = {n: p for n, p in model.model.diffusion_model.named_parameters()}
    clip_params = {n: p for n, p in clip.cond_stage_model.named_parameters()}
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=ds, lora_config=cfg, steps=200, **TRAIN,
                           text_encoder_lr=text_encoder_lr)
    finally:
        mm.interrupt_current_processing(False)
        cutils.set_progress_bar_global_hook(previous_hook)
    assert max(seen) == 3, seen
    unet = model.model.diffusion_model
    assert all(p is params[n] and p.is_inference() for n, p in unet.named_parameters())
    assert not any("forward" in m.__dict__ for m in unet.modules())
    encoders = clip.cond_stage_model
    assert all(p is clip_params[n] and p.is_inference() for n, p in encoders.named_parameters())
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in encoders.modules())


def test_load_dataset_reads_a_kohya_toml(comfy, dataset_dir, tmp_path):
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\nenable_bucket = true\nmin_bucket_reso = 32\n'
                    f'max_bucket_reso = 128\nbucket_reso_steps = 32\nresolution = 64\nbatch_size = 2\n\n'
                    f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{dataset_dir["image_dir"]}"\n'
                    f'  num_repeats = 3\n  class_tokens = "toy"\n')
    ds, summary, _preview = comfy.run_node("KilnLoadDataset", folder=str(toml), **DATASET)
    assert ds.dataset.batch_size == 2 and ds.dataset.subsets[0].num_repeats == 3
    assert "× 3 repeats" in summary and len(ds.dataset.items) == len(dataset_dir["images"])
    toml.write_text(toml.read_text() + "  keep_tokens = \"1\"\n")
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnLoadDataset", folder=str(toml), **DATASET)
    assert "'keep_tokens'" in kiln_error(e) and "line 15" in str(e.value) and "must be an integer" in str(e.value)
