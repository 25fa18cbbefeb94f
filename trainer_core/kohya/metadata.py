"""kohya's ss_* training metadata and modelspec for a trained LoRA or fine-tuned model: the keys kohya's trainers
write, with the same names and meanings, so kohya tools, A1111/Forge and LoRA browsers read Kiln's files as kohya's.
Pure Python: the nodes hand in the dataset, its cache, the config and the result."""
from __future__ import annotations

import dataclasses
import json
import math
import os

from ..training import distributed, validation
from ..options import registry
from ..data.cache import LatentCache
from ..data.dataset import Dataset
from ..training.epochs import batches_per_epoch, steps_per_epoch
from ..lora.config import LoraConfig
from ..lora.io import KOHYA, build_metadata
from ..training.loop import TrainConfig
from ..maths.optim import kohya_optimizer_name


def text_encoder_lr(tcfg: TrainConfig):
    """kohya's ss_text_encoder_lr: one number, or a list when encoders differ; 0 when no encoder trained."""
    lrs = list(tcfg.group_lrs.values())
    return 0 if not lrs else lrs[0] if len(set(lrs)) == 1 else lrs


def tag_frequency(ds: Dataset, block: int | None = None) -> dict[str, dict[str, int]]:
    """kohya's tag frequency: per image folder, how many captions (one per image, repeats not counted) hold each
    comma-separated tag."""
    tags: dict[str, dict[str, int]] = {}
    for item in ds.items:
        subset = ds.subsets[item.subset]
        if block is not None and subset.block != block:
            continue
        folder = tags.setdefault(os.path.basename(subset.image_dir.rstrip("/")), {})
        for tag in (t.strip() for t in item.caption.split(",")):
            if tag:
                folder[tag] = folder.get(tag, 0) + 1
    return tags


def bucket_info(ds: Dataset, block: int) -> dict:
    """kohya's per-dataset bucket_info: each bucket's resolution and image count (repeats included), and the mean
    aspect-ratio error between the images and their buckets."""
    counts: dict[tuple, int] = {}
    errors = []
    for item in ds.items:
        subset = ds.subsets[item.subset]
        if subset.block == block:
            counts[item.bucket] = counts.get(item.bucket, 0) + subset.num_repeats
            errors.append(abs(item.bucket[0] / item.bucket[1] - item.size[0] / item.size[1]))
    return {"buckets": {i: {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def dataset_metadata(ds: Dataset) -> dict[str, object]:
    """kohya's per-[[datasets]] ``ss_datasets`` (with each subset's caption options) and the top-level caption
    keys (``ss_shuffle_caption``, ``ss_caption_dropout_rate``, ...), written where every subset agrees."""
    blocks = []
    for block in sorted({s.block for s in ds.subsets}):
        members = [(k, s) for k, s in enumerate(ds.subsets) if s.block == block]
        b = ds.buckets_of(members[0][1])
        counts = {k: sum(1 for i in ds.items if i.subset == k) for k, _ in members}
        subsets = [{"img_count": counts[k], "num_repeats": s.num_repeats, "color_aug": s.color_aug, "flip_aug": s.flip_aug,
                    "random_crop": s.random_crop, "image_dir": os.path.basename(s.image_dir.rstrip("/")),
                    "class_tokens": s.class_tokens, "is_reg": s.is_reg, "enable_wildcard": False,
                    "resize_interpolation": None, **dataclasses.asdict(s.captions)} for k, s in members]
        blocks.append({"is_dreambooth": True, "batch_size_per_device": members[0][1].batch_size or ds.batch_size,
                       "num_train_images": sum(counts[k] * s.num_repeats for k, s in members if not s.is_reg),
                       "num_reg_images": sum(counts[k] * s.num_repeats for k, s in members if s.is_reg),
                       "resolution": list(b.resolution), "enable_bucket": b.enable_bucket,
                       "min_bucket_reso": b.min_bucket_reso, "max_bucket_reso": b.max_bucket_reso,
                       "tag_frequency": tag_frequency(ds, block), "bucket_info": bucket_info(ds, block),
                       "resize_interpolation": None, "subsets": subsets})
    out: dict[str, object] = {"datasets": json.dumps(blocks)}
    for key in ("shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                "caption_tag_dropout_rate"):
        values = {getattr(s.captions, key) for s in ds.subsets}
        if len(values) == 1:
            out[key] = values.pop()
    return out


def kohya_training_metadata(tcfg: TrainConfig, cache: LatentCache) -> dict[str, object]:
    """The ss_* keys kohya writes for its training options, epochs and validation (same names, None when off)."""
    meta = registry.metadata_of(tcfg)  # every option recorded as given, e.g. noise_offset, learning_rate
    train_part, val_part = validation.parts(cache, tcfg)
    meta["num_validation_images"] = len(val_part.samples) if val_part else 0
    meta["num_batches_per_epoch"] = batches_per_epoch(train_part, tcfg.batch_size)
    meta["num_epochs"] = math.ceil(tcfg.steps / steps_per_epoch(train_part, tcfg.batch_size, tcfg.grad_accum))
    return meta


def training_metadata(family_version: str, arch: str, ds: Dataset, cache: LatentCache, lcfg: LoraConfig | None,
                      tcfg: TrainConfig, result, model_name: str, epoch: int = 1, family_meta: dict | None = None,
                      lora_module: str = "networks.lora", implementation: str = KOHYA) -> dict[str, str]:
    """kohya's ss_* keys and modelspec for a LoRA (``lcfg``) or, without one, a fully fine-tuned model.
    ``family_meta``: what kohya's trainer for the family adds; ``lora_module``: the family's kohya LoRA module (e.g.
    networks.lora_sd3), while LyCORIS algorithms are written by lycoris.kohya whatever the family;
    ``implementation``: modelspec.implementation."""
    reg = sum(1 for i in ds.items if ds.subsets[i.subset].is_reg)
    tags = tag_frequency(ds)
    network = {} if lcfg is None else {
        "network_module": lora_module if lcfg.algorithm == "lora" else lcfg.network_module, "network_dim": lcfg.rank,
        "network_alpha": lcfg.alpha, "network_args": lcfg.network_args(), "network_dropout": lcfg.dropout}
    base = {
        **network, "text_encoder_lr": text_encoder_lr(tcfg), "steps": result.steps,
        "num_train_images": len(ds.items) - reg, "num_reg_images": reg, "batch_size_per_device": ds.batch_size,
        "total_batch_size": ds.batch_size * distributed.world() * tcfg.grad_accum,  # kohya's: per device x processes x accumulation
        "optimizer": kohya_optimizer_name(tcfg.optimizer_name, tcfg.optim.optimizer_args),
        "lr_warmup_steps": tcfg.lr_schedule().warmup_steps,
        "mixed_precision": "no" if tcfg.precision == "fp32" else tcfg.precision,  # kohya's --mixed_precision values
        "resolution": tuple(ds.buckets.resolution), "enable_bucket": ds.buckets.enable_bucket,
        "min_bucket_reso": ds.buckets.min_bucket_reso, "max_bucket_reso": ds.buckets.max_bucket_reso,
        "base_model_version": family_version, "v2": family_version.startswith("sd_v2"),
        "v_parameterization": family_version.endswith("_v"), "sd_model_name": model_name,
        "masked_loss": cache.has_masks, "epoch": epoch, **kohya_training_metadata(tcfg, cache),
        "tag_frequency": tags, "flip_aug": any(s.flip_aug for s in ds.subsets),
        # kohya keys with a fixed value in Kiln (docs/kohya.md, "The LoRA file and its metadata"): latents are always cached, LoRA weights stay fp32,
        # no face crops or comment; not trained by sd-scripts
        "session_id": tcfg.session_id, "training_started_at": tcfg.training_started_at, "full_fp16": False,
        "cache_latents": True, "lowram": False, "training_comment": None, "sd_scripts_commit_hash": None,
        "face_crop_aug_range": None,
        "resize_interpolation": None,
        "dataset_dirs": {os.path.basename(s.image_dir.rstrip("/")): {"n_repeats": s.num_repeats,
                         "img_count": sum(1 for i in ds.items if i.subset == k)} for k, s in enumerate(ds.subsets)},
        **dataset_metadata(ds), **(family_meta or {}),
    }
    meta = build_metadata(arch, base, model_name or ("kiln lora" if lcfg else "kiln model"), lora=lcfg is not None,
                          implementation=implementation)
    # which encoder trained at which rate (kohya's ss_text_encoder_lr does not say; lr1 = CLIP-L, lr2 = CLIP-G, lr3 = T5)
    meta["kiln_text_encoder_lrs"] = json.dumps(tcfg.group_lrs)
    meta["kiln_probe_loss_start"] = repr(result.probe_loss_start)
    meta["kiln_probe_loss_end"] = repr(result.probe_loss_end)
    meta["kiln_seconds_per_step"] = f"{result.seconds_per_step:.4f}"
    meta["kiln_world_size"] = str(distributed.world())  # processes that trained it (torchrun), each on batch_size
    if tcfg.preservation.diff_output_preservation:
        meta["kiln_diff_output_preservation"] = json.dumps({
            "multiplier": tcfg.preservation.diff_output_preservation_multiplier,
                                                            "pairs": tcfg.preservation_pairs})
    if tcfg.ema.ema_decay:  # the weights in the file are the average (ema.py)
        meta["kiln_ema_decay"] = repr(tcfg.ema.ema_decay)
        meta["kiln_ema_update_every"] = str(tcfg.ema.ema_update_every)
        meta["kiln_ema_warmup"] = str(tcfg.ema.ema_warmup)
    if result.validation:  # kohya logs it to trackers only; here it travels with the LoRA: [[step, loss], ...]
        meta["kiln_validation_loss"] = json.dumps([[s, round(v, 6)] for s, v in result.validation])
    return meta
