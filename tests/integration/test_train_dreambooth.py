"""Train DreamBooth in process on the tiny SD1 checkpoint: the whole UNet (and CLIP) trains, the input MODEL and
CLIP sample exactly as before, the output carries the trained weights, Kiln's Save Checkpoint writes the layout
ComfyUI's own Save Checkpoint writes (plus ss_* metadata), and CheckpointLoaderSimple loads it back."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from fixtures.kiln_nodes import DATASET
from test_train_sd1 import ksample

TRAIN = dict(steps=8, learning_rate=5e-4, optimizer="AdamW", lr_scheduler="constant", warmup_steps=0, grad_accum=1,
             max_grad_norm=1.0, seed=3, precision="fp32", gradient_checkpointing=False, loss_type="l2",
             min_snr_gamma=0.0, mask_normalize=False, prior_loss_weight=1.0, sample_prompts="a kiln toy",
             sample_every=6, sample_steps=2, sample_cfg=5.0)


@pytest.fixture(scope="module")
def loaded(comfy, sd1_checkpoint):
    return comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)


@pytest.fixture(scope="module")
def cached(comfy, loaded, dataset_dir):
    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **DATASET)[0]
    return comfy.run_node("KilnCacheLatents", dataset=ds, vae=loaded[2], batch_size=4)[0]


def state(module):
    return {n: (p, p.data_ptr(), p.detach().clone()) for n, p in module.named_parameters()}


def same_bits(a, b) -> bool:
    """Bit-identical (torch.equal is False for NaN, and the fixture's unused CLIP text_projection is uninitialised)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.detach().cpu().numpy().tobytes() == b.detach().cpu().numpy().tobytes()


def assert_as_before(module, before):
    now = dict(module.named_parameters())
    assert now.keys() == before.keys()
    for n, (p, ptr, values) in before.items():
        assert now[n] is p and p.data_ptr() == ptr and same_bits(p, values), n


@pytest.fixture(scope="module")
def trained(comfy, loaded, cached):
    model, clip, vae = loaded
    unet = model.model.diffusion_model
    params = state(unet)
    before = ksample(comfy, model, clip)
    out = comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **TRAIN)
    progress, events = list(comfy.progress), list(comfy.events)
    return dict(out=out, before=before, after=ksample(comfy, model, clip), params=params, model=model, clip=clip,
                vae=vae, progress=progress, events=events)


def test_input_model_samples_bit_identically_and_keeps_its_own_tensors(trained):
    assert torch.equal(trained["before"], trained["after"])
    assert_as_before(trained["model"].model.diffusion_model, trained["params"])


def test_the_whole_unet_trains_and_the_output_model_samples_differently(comfy, trained):
    model_out, clip_out, samples, plot = trained["out"]
    assert clip_out is trained["clip"]  # no text-encoder learning rate: the input CLIP as given
    patches = model_out.patches
    unet_keys = {f"diffusion_model.{n}" for n in trained["params"]}
    assert unet_keys == set(patches)  # every UNet weight carries its trained value
    changed = sum(not torch.equal(patches[k][-1][1][1][0], trained["params"][k[len("diffusion_model."):]][2])
                  for k in unet_keys)
    assert changed > 0.9 * len(unet_keys)
    meta = model_out.model_options["kiln_checkpoint_metadata"]
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and "ss_network_module" not in meta
    assert meta["ss_learning_rate"] == "0.0005" and meta["ss_base_model_version"] == "sd_v1"
    assert not torch.equal(ksample(comfy, model_out, trained["clip"]), trained["before"])
    assert samples.shape == (1, 64, 64, 3) and plot.shape[-1] == 3
    losses = [d for e, d in trained["events"] if e == "kiln.loss"]
    assert len(losses) == TRAIN["steps"]
    assert any(prev is not None for *_, prev in trained["progress"])


def test_saved_checkpoint_has_the_stock_layout_metadata_and_loads_back(comfy, trained, tmp_path):
    model_out, clip_out, _, _ = trained["out"]
    path = comfy.run_node("KilnSaveCheckpoint", model=model_out, clip=clip_out, vae=trained["vae"],
                          filename="kiln_test/db_saved", overwrite=True)[0]
    assert os.path.basename(path) == "db_saved.safetensors" and os.path.isfile(path)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    comfy.run_node("CheckpointSave", model=model_out, clip=clip_out, vae=trained["vae"],
                   filename_prefix="kiln_test/stock")
    import folder_paths
    stock_dir = os.path.join(folder_paths.get_output_directory(), "kiln_test")
    stock = os.path.join(stock_dir, sorted(f for f in os.listdir(stock_dir) if f.startswith("stock"))[-1])
    with safe_open(path, "pt") as ours, safe_open(stock, "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())  # what ComfyUI's own Save Checkpoint writes, key for key
        keys = set(ours.keys())
        for k in ("model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
            assert same_bits(ours.get_tensor(k), theirs.get_tensor(k)), k
        meta = ours.metadata()
    # the layout A1111 / Forge read for SD1: compvis UNet, HF CLIP-L under cond_stage_model.transformer, VAE
    assert {k.split(".")[0] for k in keys} == {"model", "cond_stage_model", "first_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in keys)
    assert meta["ss_output_name"] == "db_saved" and meta["modelspec.predict_key"] == "epsilon"
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
    model2, clip2, _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name="kiln_test/db_saved.safetensors")
    assert torch.equal(ksample(comfy, model2, clip2), ksample(comfy, model_out, clip_out))


def test_text_encoder_trains_until_stop_and_the_input_clip_is_left_alone(comfy, loaded, cached):
    model, clip, _ = loaded
    encoders = clip.cond_stage_model
    before = state(encoders)
    text_before = comfy.run_node("CLIPTextEncode", clip=clip, text="a kiln toy")[0][0][0].clone()
    opts = TRAIN | dict(steps=3, sample_every=0, sample_steps=1, optimizer="SGD", max_grad_norm=0.0,
                        fused_backward_pass=True)
    model_out, clip_out, _, _ = comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **opts,
                                               text_encoder_lr=1e-2, stop_text_encoder_training=2)
    assert_as_before(encoders, before)
    assert torch.equal(comfy.run_node("CLIPTextEncode", clip=clip, text="a kiln toy")[0][0][0], text_before)
    text_after = comfy.run_node("CLIPTextEncode", clip=clip_out, text="a kiln toy")[0][0][0]
    assert not torch.equal(text_after, text_before)
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(clip_out.patcher.patches[key][-1][1][1][0], before[key][2])
    meta = model_out.model_options["kiln_checkpoint_metadata"]
    assert meta["kiln_trained"] == "unet,clip_l" and meta["ss_stop_text_encoder_training"] == "2"
    assert meta["ss_text_encoder_lr"] == "0.01" and meta["ss_fused_backward_pass"] == "True"


def test_a_nan_loss_restores_the_input_and_keeps_the_last_intermediate_checkpoint(comfy, loaded, cached):
    import folder_paths
    model, clip, _ = loaded
    before = ksample(comfy, model, clip)  # loads the input MODEL: an output MODEL sampled before has its patches off
    params = state(model.model.diffusion_model)
    folder = os.path.join(folder_paths.get_folder_paths("checkpoints")[0], "kiln_nan")
    opts = TRAIN | dict(steps=6, learning_rate=1e4, optimizer="SGD", max_grad_norm=0.0, sample_every=0,
                        sample_steps=1, save_every_n_steps=1, save_name="kiln_nan/run")
    with pytest.raises(Exception, match="the loss became"):
        comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **opts)
    assert_as_before(model.model.diffusion_model, params)
    assert torch.equal(ksample(comfy, model, clip), before)
    names = sorted(os.listdir(folder))
    files = [f for f in names if f.endswith(".safetensors")]
    assert files and all(f.startswith("run-step") for f in files), names
    assert [f for f in names if not f.endswith(".safetensors")] == [files[-1][:-len(".safetensors")] + ".kiln-state"]
    with safe_open(os.path.join(folder, files[-1]), "pt") as f:
        assert "model.diffusion_model.out.2.weight" in set(f.keys())
        assert f.metadata()["ss_steps"] == files[-1][len("run-step"):-len(".safetensors")].lstrip("0")


def test_cancel_restores_model_and_clip_and_keeps_the_intermediate_checkpoint(comfy, loaded, cached):
    import comfy.model_management as mm
    import comfy.utils as cutils
    import folder_paths
    model, clip, _ = loaded
    mm.load_models_gpu([model, clip.load_model()])  # the input's own weights in place (no output's patches)
    unet, encoders = model.model.diffusion_model, clip.cond_stage_model
    params, clip_params = state(unet), state(encoders)
    previous_hook, seen = cutils.PROGRESS_BAR_HOOK, []

    def cancel_after_1(value, total, preview=None, prompt_id=None, node_id=None):
        seen.append(value)
        if value == 1:  # step 1 ends with its checkpoint saved; step 2's progress update sees the Cancel
            mm.interrupt_current_processing(True)  # what the Cancel button / POST /interrupt does
    cutils.set_progress_bar_global_hook(cancel_after_1)
    opts = TRAIN | dict(steps=50, sample_every=0, sample_steps=1, optimizer="SGD", save_every_n_steps=1,
                        save_name="kiln_cancel/run")
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **opts, text_encoder_lr=1e-3)
    finally:
        mm.interrupt_current_processing(False)
        cutils.set_progress_bar_global_hook(previous_hook)
    assert max(seen) == 1, seen
    assert_as_before(unet, params)
    assert_as_before(encoders, clip_params)
    assert all(p.is_inference() for p in list(unet.parameters()) + list(encoders.parameters()))
    folder = os.path.join(folder_paths.get_folder_paths("checkpoints")[0], "kiln_cancel")
    assert sorted(os.listdir(folder)) == ["run-step00000001.kiln-state", "run-step00000001.safetensors"]  # nothing half-written
    with safe_open(os.path.join(folder, "run-step00000001.safetensors"), "pt") as f:
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in set(f.keys())


@pytest.mark.slow
def test_save_every_n_steps_then_resume_exactly(comfy, loaded, cached):
    """Intermediate checkpoints with the newest one's .kiln-state; resuming from it (text encoder and EMA included,
    across stop_text_encoder_training) ends bit-identical to the run that went on; an older one resumes from its weights
    and says so; a name that is not there is refused."""
    import folder_paths
    model, clip, _ = loaded
    folder = os.path.join(folder_paths.get_folder_paths("checkpoints")[0], "kiln_resume")
    opts = TRAIN | dict(steps=7, sample_every=0, sample_steps=1, lr_scheduler="cosine", text_encoder_lr=1e-3,
                        stop_text_encoder_training=6, training_args="ema_decay=0.9")  # the EMA resumes too
    full = comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **opts, save_every_n_steps=2,
                          save_name="kiln_resume/run")
    assert sorted(os.listdir(folder)) == ["run-step00000002.safetensors", "run-step00000004.safetensors",
                                          "run-step00000006.kiln-state", "run-step00000006.safetensors"]  # older states go
    out = comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **opts,
                         resume_from="kiln_resume/run-step00000006.safetensors")
    assert "resuming exactly at step 6" in " ".join(map(str, out.ui["text"]))
    assert full[0].model_options["kiln_checkpoint_metadata"]["kiln_ema_decay"] == "0.9"
    for a, b in ((full[0], out[0]), (full[1].patcher, out[1].patcher)):  # UNet, then CLIP
        assert a.patches.keys() == b.patches.keys() and a.patches
        # same_bits, not torch.equal: the fixture CLIP's unused text_projection is uninitialised memory, NaN at times
        assert all(same_bits(a.patches[k][-1][1][1][0], b.patches[k][-1][1][1][0]) for k in a.patches)
    older = comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **opts,
                           resume_from="kiln_resume/run-step00000004.safetensors")
    assert "no run-step00000004.kiln-state beside it" in " ".join(map(str, older.ui["text"]))
    with pytest.raises(Exception) as err:
        comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached, **opts,
                       resume_from="kiln_resume/nothing.safetensors")
    assert type(err.value).__name__ == "KilnError" and "not a file in models/checkpoints" in str(err.value)
