"""kohya's ss_* metadata, key by key: the list below is written from sd-scripts' train_network.py (the metadata
dict of train(), the dataset-config branch, ss_network_args, ss_sd_model_name; str() of every value) for the
settings this test trains with (SD1, a dataset folder, LoRA rank 2, no validation, no VAE file). Kiln's file must
hold every key in the same format; keys Kiln cannot know carry the value docs/kohya.md documents."""
from __future__ import annotations

import json
import re

import pytest

from test_train_sd1 import TRAIN

INT, FLOAT, BOOL, NONE = r"-?\d+", r"-?\d+(\.\d+)?(e-?\d+)?", r"True|False", r"None"
STR = r".*"


def opt(kind: str) -> str:
    return rf"{kind}|None"


# train_network.py, train(): metadata = {...}
KOHYA = {
    "ss_session_id": INT, "ss_training_started_at": FLOAT, "ss_output_name": STR, "ss_learning_rate": FLOAT,
    "ss_text_encoder_lr": FLOAT, "ss_unet_lr": opt(FLOAT), "ss_num_train_images": INT, "ss_num_validation_images": INT,
    "ss_num_reg_images": INT, "ss_num_batches_per_epoch": INT, "ss_num_epochs": INT, "ss_gradient_checkpointing": BOOL,
    "ss_gradient_accumulation_steps": INT, "ss_max_train_steps": INT, "ss_lr_warmup_steps": INT,
    "ss_lr_scheduler": STR, "ss_network_module": r"networks\.lora", "ss_network_dim": INT, "ss_network_alpha": FLOAT,
    "ss_network_dropout": opt(FLOAT), "ss_mixed_precision": r"no|fp16|bf16", "ss_full_fp16": BOOL, "ss_v2": BOOL,
    "ss_base_model_version": r"sd_v1", "ss_clip_skip": opt(INT), "ss_max_token_length": opt(INT),
    "ss_cache_latents": BOOL, "ss_seed": INT, "ss_lowram": BOOL, "ss_noise_offset": opt(FLOAT),
    "ss_multires_noise_iterations": opt(INT), "ss_multires_noise_discount": FLOAT, "ss_adaptive_noise_scale": opt(FLOAT),
    "ss_zero_terminal_snr": BOOL, "ss_training_comment": opt(STR), "ss_sd_scripts_commit_hash": STR,
    "ss_optimizer": r"[\w.]+(\(.*\))?", "ss_max_grad_norm": FLOAT, "ss_caption_dropout_rate": FLOAT,
    "ss_caption_dropout_every_n_epochs": INT, "ss_caption_tag_dropout_rate": FLOAT, "ss_face_crop_aug_range": NONE,
    "ss_prior_loss_weight": FLOAT, "ss_min_snr_gamma": opt(FLOAT), "ss_scale_weight_norms": NONE,
    "ss_ip_noise_gamma": opt(FLOAT), "ss_debiased_estimation": BOOL, "ss_noise_offset_random_strength": BOOL,
    "ss_ip_noise_gamma_random_strength": BOOL, "ss_loss_type": r"l1|l2|huber|smooth_l1", "ss_huber_schedule": STR,
    "ss_huber_scale": FLOAT, "ss_huber_c": FLOAT, "ss_fp8_base": BOOL, "ss_fp8_base_unet": BOOL,
    "ss_validation_seed": opt(INT), "ss_validation_split": opt(FLOAT), "ss_max_validation_steps": opt(INT),
    "ss_validate_every_n_epochs": opt(INT), "ss_validate_every_n_steps": opt(INT), "ss_resize_interpolation": NONE,
    # the dataset-config branch (a folder is one [[datasets]] with its subsets): JSON
    "ss_datasets": "json", "ss_tag_frequency": "json", "ss_dataset_dirs": "json",
    # after the dict: network_args (only when given), the model name, the finishing keys
    "ss_network_args": "json", "ss_sd_model_name": STR, "ss_training_finished_at": FLOAT, "ss_steps": INT,
    "ss_epoch": INT,
}
DATASET_KEYS = {"is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images", "resolution",
                "enable_bucket", "min_bucket_reso", "max_bucket_reso", "tag_frequency", "bucket_info",
                "resize_interpolation", "subsets"}
SUBSET_KEYS = {"img_count", "num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption", "keep_tokens",
               "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
               "resize_interpolation", "image_dir", "class_tokens", "is_reg"}
# keys Kiln cannot know, with the value docs/kohya.md documents
DOCUMENTED = {"ss_sd_scripts_commit_hash": "None", "ss_training_comment": "None", "ss_sd_model_name": "",
              "ss_cache_latents": "True", "ss_full_fp16": "False", "ss_lowram": "False", "ss_fp8_base": "False",
              "ss_fp8_base_unet": "False", "ss_face_crop_aug_range": "None", "ss_scale_weight_norms": "None",
              "ss_resize_interpolation": "None"}


@pytest.fixture(scope="module")
def meta(comfy, sd1_checkpoint, dataset_dir):
    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), caption_extension=".txt",
                        class_tokens="", repeats=1, resolution=64, batch_size=2, enable_bucket=True, min_bucket_reso=32,
                        max_bucket_reso=128, bucket_reso_steps=32, bucket_no_upscale=False)[0]
    cached = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    cfg = comfy.run_node("KilnLoraConfig", rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    lora = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=cfg,
                          **(TRAIN | dict(steps=1, sample_every=0, sample_steps=1)))[1]
    out = dict(lora.metadata)
    out["ss_output_name"] = "x"  # Save LoRA writes it (the file's name)
    return out


def test_every_kohya_key_is_there_in_kohyas_format(meta):
    missing = [k for k in KOHYA if k not in meta]
    assert missing == []
    for key, kind in KOHYA.items():
        value = meta[key]
        if kind == "json":
            json.loads(value)
        else:
            assert re.fullmatch(kind, value), (key, value)


def test_dataset_entries_hold_kohyas_keys(meta):
    datasets = json.loads(meta["ss_datasets"])
    assert datasets and all(DATASET_KEYS <= set(d) for d in datasets)
    assert all(SUBSET_KEYS <= set(s) for d in datasets for s in d["subsets"])
    # kohya counts each caption once per image, repeats not counted
    freq = json.loads(meta["ss_tag_frequency"])
    subset = datasets[0]["subsets"][0]
    assert max(n for tags in freq.values() for n in tags.values()) <= subset["img_count"]
    assert sum(b["count"] for b in datasets[0]["bucket_info"]["buckets"].values()) == datasets[0]["num_train_images"]


def test_keys_kiln_cannot_know_carry_the_documented_value(meta):
    assert {k: meta[k] for k in DOCUMENTED} == DOCUMENTED
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
