"""Reliability through ComfyUI's own execution path (issue 17): option values and paths are checked before the
first training step, a rank mismatch on resume is refused, and training that changes nothing is an error."""
from __future__ import annotations

import pytest

from test_errors_and_cancel import DATASET, TRAIN, kiln_error

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
