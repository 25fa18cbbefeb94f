"""Reliability through ComfyUI's own execution path (issue 17): option values and paths are checked before the
first training step, a rank mismatch on resume is refused, and training that changes nothing is an error."""
from __future__ import annotations

import pytest

from fixtures.kiln_nodes import DATASET, kiln_error
from test_errors_and_cancel import TRAIN

LORA = dict(rank=2, alpha=2.0, conv_rank=0, conv_alpha=1.0, dropout=0.0, rank_dropout=0.0, module_dropout=0.0)


@pytest.fixture(scope="module")
def setup(comfy, sd1_checkpoint, dataset_dir):
    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **DATASET)[0]
    ds = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    return dict(model=model, clip=clip, dataset=ds, lora_config=comfy.run_node("KilnLoraConfig", **LORA)[0])


@pytest.fixture(scope="module")
def lora(comfy, setup):
    return comfy.run_node("KilnTrainSD1", **setup, **{**TRAIN, "steps": 2})[1]


def train(comfy, setup, **kw):
    return comfy.run_node("KilnTrainSD1", **setup, **{**TRAIN, "steps": 2, **kw})


def steps_run(comfy) -> int:
    return max((v for v, _, _ in comfy.progress), default=0)


@pytest.mark.parametrize("name, value", [("precision", "Foo"), ("optimizer", "adamw"), ("lr_scheduler", "cosine2"),
                                         ("loss_type", "L2")])
def test_combo_values_from_the_api_are_checked_when_the_train_node_starts(comfy, setup, name, value):
    with pytest.raises(Exception) as e:
        train(comfy, setup, steps=50, **{name: value})
    msg = kiln_error(e)
    assert name in msg and repr(value) in msg and "choices" in msg
    assert steps_run(comfy) == 0


def test_save_lora_and_mask_source_check_their_combos(comfy, setup, lora):
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnSaveLora", lora=lora, filename="kiln/x", precision="Foo", overwrite=True)
    assert "precision" in kiln_error(e) and "'Foo'" in str(e.value) and "fp16" in str(e.value)
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnMaskSource", dataset=setup["dataset"], mode="Alpha", mask_folder="",
                       missing_mask_is_white=False)
    assert "mode" in kiln_error(e) and "'Alpha'" in str(e.value)


@pytest.mark.parametrize("save_name, words", [("kiln/bad\x00name", ["save_name", "control character"]),
                                               ("kiln/tab\tname", ["save_name", "control character"]),
                                               ("../../escape", ["save_name", "outside models/loras"])])
def test_a_bad_save_name_is_refused_before_step_one(comfy, setup, save_name, words):
    with pytest.raises(Exception) as e:
        train(comfy, setup, steps=50, save_every_n_steps=10, save_name=save_name)
    assert all(w in kiln_error(e) for w in words), str(e.value)
    assert steps_run(comfy) == 0


@pytest.mark.parametrize("resume_from, words", [("nope/missing.safetensors", ["not a file in models/loras"]),
                                                 ("kiln/x\x00y", ["resume_from", "control character"])])
def test_a_bad_resume_from_is_refused_before_step_one(comfy, setup, resume_from, words):
    with pytest.raises(Exception) as e:
        train(comfy, setup, steps=50, resume_from=resume_from)
    assert all(w in kiln_error(e) for w in words), str(e.value)
    assert steps_run(comfy) == 0


def test_save_lora_refuses_control_characters_by_input_name(comfy, lora):
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnSaveLora", lora=lora, filename="kiln/a\x00b", precision="fp16", overwrite=True)
    assert "filename" in kiln_error(e) and "control character" in str(e.value)


def test_resume_from_a_lora_of_another_rank_is_refused(comfy, setup, lora):
    comfy.run_node("KilnSaveLora", lora=lora, filename="kiln/rank2", precision="fp32", overwrite=True)
    rank4 = comfy.run_node("KilnLoraConfig", **{**LORA, "rank": 4})[0]
    with pytest.raises(Exception) as e:
        train(comfy, {**setup, "lora_config": rank4}, resume_from="kiln/rank2.safetensors")
    msg = kiln_error(e)
    assert "rank 2" in msg and "rank 4" in msg and "lora_unet_" in msg


def test_intermediate_saves_never_replace_another_runs_and_a_resume_says_what_changed(comfy, setup):
    folder = comfy.loras_dir / "kiln"
    opts = dict(steps=2, save_every_n_steps=1, save_name="kiln/series")
    first = train(comfy, setup, **opts)
    mine = folder / "series-step00000001.safetensors"
    before = (mine.read_bytes(), mine.with_suffix(".kiln-state").read_bytes())
    second = train(comfy, setup, **{**opts, "seed": 1})
    assert (mine.read_bytes(), mine.with_suffix(".kiln-state").read_bytes()) == before
    assert (folder / "series_2-step00000001.safetensors").is_file()
    text = " ".join(map(str, second.ui["text"]))
    assert "series_2-stepNNNNNNNN" in text and "another run" in text
    assert "another run" not in " ".join(map(str, first.ui["text"]))
    # resuming that series continues it (no new name), with the changed learning rate applied and reported
    out = train(comfy, setup, **{**opts, "learning_rate": 1e-5}, resume_from="kiln/series-step00000001.safetensors")
    text = " ".join(map(str, out.ui["text"]))
    assert "learning_rate 0.001 → 1e-05" in text and "no longer exactly" in text and "series_3" not in text


def test_clip_skip_leaves_the_unreached_text_encoder_layers_out(comfy, setup):
    """kohya's SD2 text encoder has no last layer (SD2 reads the penultimate one); under CLIP Set Last Layer -2 a
    LoRA on layer 11 of CLIP-L could never change the output either, so none is trained or saved."""
    clip = comfy.run_node("CLIPSetLastLayer", clip=setup["clip"], stop_at_clip_layer=-2)[0]
    layers = len(clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers)
    sd = train(comfy, {**setup, "clip": clip}, text_encoder_lr=1e-3)[1].state_dict
    te = {k.split(".")[0] for k in sd if k.startswith("lora_te_")}
    assert len(te) == 6 * (layers - 1)
    assert not any(f"_layers_{layers - 1}_" in k for k in te) and any(f"_layers_{layers - 2}_" in k for k in te)


def test_cancel_keeps_the_last_intermediate_save_and_it_resumes(comfy, setup):
    import importlib
    from safetensors.torch import load_file
    mm = importlib.import_module("comfy.model_management")
    cutils = importlib.import_module("comfy.utils")
    previous_hook = cutils.PROGRESS_BAR_HOOK

    def cancel_at_3(value, total, preview=None, prompt_id=None, node_id=None):
        if value == 3:
            mm.interrupt_current_processing(True)
    cutils.set_progress_bar_global_hook(cancel_at_3)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(comfy, setup, steps=50, save_every_n_steps=2, save_name="kiln/cancelled")
    finally:
        mm.interrupt_current_processing(False)
        cutils.set_progress_bar_global_hook(previous_hook)
    kept = comfy.loras_dir / "kiln" / "cancelled-step00000002.safetensors"
    assert load_file(str(kept)) and kept.with_suffix(".kiln-state").is_file()
    assert not (comfy.loras_dir / "kiln" / "cancelled-step00000004.safetensors").exists()
    out = train(comfy, setup, steps=4, resume_from="kiln/cancelled-step00000002.safetensors")
    text = " ".join(map(str, out.ui["text"]))
    assert "resumed at step 2" in text and "steps 50 → 4" in text and "exactly" not in text.replace("no longer exactly", "")


def test_fingerprints_follow_captions_masks_and_tomls(comfy, tmp_path):
    """What ComfyUI compares on every Queue (the e2e test runs the whole round trip through a server)."""
    import math
    import time
    from fixtures.datasets import make_dataset
    data = make_dataset(tmp_path / "fp", count=3)
    load, masks = comfy.node_class("KilnLoadDataset"), comfy.node_class("KilnMaskSource")
    toml = tmp_path / "fp.toml"
    toml.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{data["image_dir"]}"\n')

    def prints():
        return (load.fingerprint_inputs(folder=str(data["train_dir"])), load.fingerprint_inputs(folder=str(toml)),
                masks.fingerprint_inputs(mode="folder", mask_folder=str(data["mask_dir"])))
    first = prints()
    assert prints() == first  # nothing changed: ComfyUI may serve its cache
    time.sleep(0.01)
    caption = data["images"][0].with_suffix(".txt")
    caption.write_text(caption.read_text().replace("kiln toy", "kiln tay"))  # same size, new time
    after_caption = prints()
    assert after_caption[0] != first[0] and after_caption[1] != first[1] and after_caption[2] == first[2]
    data["masks"][2].write_bytes(data["masks"][2].read_bytes() + b"\0")  # a replaced mask
    assert prints()[2] != after_caption[2]
    toml.write_text(toml.read_text() + "  num_repeats = 2\n")
    assert prints()[1] != after_caption[1]
    assert math.isnan(load.fingerprint_inputs())  # a linked folder is unknown: always run again
    assert masks.fingerprint_inputs(mode="alpha", mask_folder="") == "alpha"


def test_sd2s_penultimate_default_and_clip_skip_bound_the_text_encoder_layers(comfy):
    """SD2's CLIP-H reads layer -2 by default (ComfyUI's SD2ClipHModel): its last layer (23) is never reached, as in
    kohya's SD2 text encoder, which has no layer 23. Checked on ComfyUI's own SDClipModel settings, without the
    700 MB OpenCLIP-H."""
    import sys
    from types import SimpleNamespace as NS
    text = sys.modules[comfy.node_class("KilnTrainSD1").__module__.rsplit(".", 1)[0] + ".comfy.text"]
    sd2 = NS(layer_idx=None, cond_stage_model=NS(clip_h=NS(num_layers=24, options_default=("hidden", -2, True))))
    assert text.last_layer_reached(sd2, "clip_h") == 22
    sd1 = NS(layer_idx=None, cond_stage_model=NS(clip_l=NS(num_layers=12, options_default=("last", None, False))))
    assert text.last_layer_reached(sd1, "clip_l") is None
    assert text.last_layer_reached(NS(layer_idx=-3, cond_stage_model=sd1.cond_stage_model), "clip_l") == 9
    assert text.last_layer_reached(NS(layer_idx=-24, cond_stage_model=sd1.cond_stage_model), "clip_l") is None
