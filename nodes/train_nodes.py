"""Train LoRA (SD1): validation and conversion around trainer_core.loop.train."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from comfy_api.latest import io, ui

import folder_paths

from ..trainer_core.atomic import check_writable
from ..trainer_core.cache import LatentCache
from ..trainer_core.data.captions import base_caption
from ..trainer_core.data.dataset import Dataset
from ..trainer_core import distributed, validation
from ..trainer_core.errors import KilnError
from ..trainer_core.families import sd1, sd3, sdxl
from ..trainer_core.lora.config import LoraConfig
from ..trainer_core.lora.io import TrainedLora, build_metadata, load_lora_file, save_lora_file
from ..trainer_core.lora.network_args import bool_arg, check_keys, parse_network_args
from ..trainer_core.latent_store import DiskStore
from ..trainer_core.lora.text_encoders import te_namer, te_rules
from ..trainer_core.lora.network import LoRANetwork
from ..trainer_core.lora.blocks import (NETWORK_ARGS as BLOCK_ARGS, BlockPlan, block_index, block_name, block_plan,
                                        loraplus_ratios, total_blocks)
from ..trainer_core.loop import PRECISIONS, StepInfo, TrainConfig, TrainResult, train
from ..trainer_core.losses import LOSS_TYPES
from ..trainer_core.optim import OPTIMIZERS, SCHEDULERS, kohya_optimizer_name
from ..trainer_core.plot import loss_plot
from ..trainer_core.tracking import TensorBoardLog, tensorboard_log
from ..trainer_core.epochs import (batches_per_epoch, epoch_save_to_remove, resolve_epochs, step_save_to_remove,
                                   steps_per_epoch)
from ..trainer_core.noise import NoiseOptions
from ..trainer_core.block_swap import block_swap
from ..trainer_core.training_args import describe as describe_training_args, effective, parse_training_args
from ..trainer_core.preservation import pairs_from
from ..trainer_core.resume import SUFFIX, load_state, save_state, state_path
from ..trainer_core.sample_prompts import (SamplePrompt, comfy_sampler, is_prompt_file, load_prompt_file,
                                           parse_sample_prompts)
from .comfy import model as cmodel
from .comfy.preview import PreviewSpec, known_sampler, pil_to_image, sample_images, to_pil
from .comfy.progress import Progress
from .comfy.tensors import normal_tensor
from .comfy.text import SD3TextConditioning, SDXLTextConditioning, TextConditioning, last_layer_reached, \
    text_encoder_names, text_encoder_session, with_clip_skip
from .dataset_nodes import confinement, default_cache_folder
from ..trainer_core.data.confine import check_inside
from .lora_nodes import check_output_file, lora_output_path
from .options import check_options, check_text
from .types import KilnDataset, KilnDatasetType, KilnLoraConfigType, KilnLoraType


log = logging.getLogger("kiln")


def te_lr_input(name: str, what: str) -> io.Float.Input:
    return io.Float.Input(name, default=0.0, min=0.0, max=10.0, step=1e-6, optional=True,
                          tooltip=f"Learning rate of the {what} LoRA; 0 = {what} not trained. (kohya differs: there "
                                  f"an unset text-encoder LR trains at learning_rate, and network_train_unet_only "
                                  f"switches the encoders off; cli --config follows kohya.)")


def common_inputs(min_snr: bool = True, sample_cfg: float = 7.0, learning_rate: float = 1e-4) -> list:
    """Schedule, optimizer, precision, loss and sampling options shared by every Train node."""
    inputs = [
        io.Int.Input("steps", default=500, min=1, max=1_000_000),
        io.Float.Input("learning_rate", default=learning_rate, min=0.0, max=10.0, step=1e-6),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW"),
        io.Combo.Input("lr_scheduler", options=list(SCHEDULERS), default="constant"),
        io.Int.Input("warmup_steps", default=0, min=0, max=100_000),
        io.Int.Input("grad_accum", default=1, min=1, max=1024),
        io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, tooltip="0 = no clipping."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True),
        io.Combo.Input("precision", options=["auto"] + list(PRECISIONS), default="auto",
                       tooltip="Autocast dtype; auto = bf16 on GPUs that support it, else fp32. LoRA weights stay fp32."),
        io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Less memory, ~30% slower."),
        io.Combo.Input("loss_type", options=list(LOSS_TYPES), default="l2"),
        io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=100.0, step=0.5, tooltip="0 = off; 5 is the paper's value."),
        io.Boolean.Input("mask_normalize", default=False, tooltip="Mean loss over the masked area, so small subjects weigh as much as large ones."),
        io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Loss weight of regularization images."),
        io.String.Input("sample_prompts", default="", multiline=True,
                        tooltip="One prompt per line, sampled during and after training, with kohya's options: "
                                "--n negative, --w/--h size, --d seed, --s steps, --l CFG, --ss sampler (e.g. "
                                "'a toy --n blurry --w 768 --h 512 --d 42'). Or the path of a kohya prompt file "
                                "(.txt/.toml/.json; relative: in ComfyUI's input folder). Empty: the first caption."),
        io.Int.Input("sample_every", default=0, min=0, max=100_000, tooltip="Preview a sample every N steps; 0 = only at the end."),
        io.Int.Input("sample_steps", default=20, min=1, max=150),
        io.Float.Input("sample_cfg", default=sample_cfg, min=0.0, max=30.0, step=0.5),
        io.String.Input("sample_negative", default="", multiline=True, optional=True,
                        tooltip="Negative prompt of the sample previews."),
        io.Int.Input("save_every_n_steps", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="Also write the LoRA (and a .kiln-state file to resume from) every N steps, as "
                             "<save_name>-step000N.safetensors in models/loras. 0 = off."),
        io.String.Input("save_name", default="kiln/checkpoint", optional=True,
                        tooltip="Name (inside models/loras) of the intermediate LoRAs."),
        io.String.Input("resume_from", default="", optional=True,
                        tooltip="A LoRA in models/loras to continue from, e.g. kiln/checkpoint-step000500.safetensors. "
                                "With its .kiln-state beside it and the same seed, data and steps, training continues "
                                "exactly where it stopped; otherwise it starts from the LoRA's weights."),
        io.Boolean.Input("cache_text_encoder_outputs_to_disk", default=False, optional=True,
                         tooltip="Keep the text encoders' outputs per caption on disk (ComfyUI's user/__kiln_cache/"
                                 "text), so the next run skips encoding. Not with caption augmentation or "
                                 "text-encoder training (the outputs change every step)."),
    ]
    return [i for i in inputs if min_snr or i.id != "min_snr_gamma"]


def train_outputs() -> list:
    return [
        io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
        KilnLoraType.Output(display_name="lora"),
        io.Image.Output(display_name="samples"),
        io.Image.Output(display_name="loss_plot"),
        io.Clip.Output(display_name="clip", tooltip="The input CLIP with the text-encoder LoRA applied (as given when "
                                                   "only the UNet trains)."),
    ]


def normal_cache(cache: LatentCache) -> LatentCache:
    """Cache tensors made inside inference mode, re-made as ordinary tensors autograd may save."""
    return cache.map_tensors(normal_tensor)


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


def remove_save(path: str) -> None:
    """An older intermediate LoRA and its training state (save_last_n_epochs / save_last_n_steps)."""
    for p in (path, state_path(path)):
        if os.path.exists(p):
            os.remove(p)
            log.info("kiln: removed old checkpoint %s", p)


def kohya_training_metadata(tcfg: TrainConfig, cache: LatentCache) -> dict[str, object]:
    """The ss_* keys kohya writes for its training options, epochs and validation (same names, None when off)."""
    meta = {k: getattr(tcfg, k) for k in (
        "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
        "multires_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength", "zero_terminal_snr",
        "loss_type", "huber_schedule", "huber_c", "huber_scale", "min_timestep", "max_timestep", "v_pred_like_loss",
        "scale_v_pred_loss_like_noise_pred", "validation_seed", "validation_split", "max_validation_steps",
        "validate_every_n_epochs", "validate_every_n_steps")}
    meta["debiased_estimation"] = tcfg.debiased_estimation_loss
    train_part, val_part = validation.parts(cache, tcfg)
    meta["num_validation_images"] = len(val_part.samples) if val_part else 0
    meta["num_batches_per_epoch"] = batches_per_epoch(train_part, tcfg.batch_size)
    meta["num_epochs"] = math.ceil(tcfg.steps / steps_per_epoch(train_part, tcfg.batch_size, tcfg.grad_accum))
    return meta


def training_metadata(family_version: str, arch: str, data: KilnDataset, lcfg: LoraConfig | None, tcfg: TrainConfig,
                      result, model_name: str, epoch: int = 1, family_meta: dict | None = None,
                      lora_module: str = "networks.lora") -> dict[str, str]:
    """kohya's ss_* keys and modelspec for a LoRA (``lcfg``) or, without one, a fully fine-tuned model.
    ``family_meta``: what kohya's trainer for the family adds; ``lora_module``: the family's kohya LoRA module (e.g.
    networks.lora_sd3), while LyCORIS algorithms are written by lycoris.kohya whatever the family."""
    ds = data.dataset
    reg = sum(1 for i in ds.items if ds.subsets[i.subset].is_reg)
    tags = tag_frequency(ds)
    network = {} if lcfg is None else {
        "network_module": lora_module if lcfg.algorithm == "lora" else lcfg.network_module, "network_dim": lcfg.rank,
        "network_alpha": lcfg.alpha, "network_args": lcfg.network_args(), "network_dropout": lcfg.dropout}
    base = {
        **network, "learning_rate": tcfg.learning_rate, "unet_lr": tcfg.learning_rate,
        "text_encoder_lr": text_encoder_lr(tcfg), "max_train_steps": tcfg.steps, "steps": result.steps,
        "num_train_images": len(ds.items) - reg, "num_reg_images": reg, "batch_size_per_device": ds.batch_size,
        "total_batch_size": ds.batch_size * distributed.world() * tcfg.grad_accum,  # kohya's: per device x processes x accumulation
        "gradient_accumulation_steps": tcfg.grad_accum,
        "optimizer": kohya_optimizer_name(tcfg.optimizer_name, tcfg.optimizer_args), "lr_scheduler": tcfg.lr_scheduler,
        "lr_warmup_steps": tcfg.schedule().warmup_steps, "seed": tcfg.seed,
        "mixed_precision": "no" if tcfg.precision == "fp32" else tcfg.precision,  # kohya's --mixed_precision values
        "min_snr_gamma": tcfg.min_snr_gamma, "prior_loss_weight": tcfg.prior_loss_weight,
        "max_grad_norm": tcfg.max_grad_norm, "gradient_checkpointing": tcfg.gradient_checkpointing,
        "resolution": tuple(ds.buckets.resolution), "enable_bucket": ds.buckets.enable_bucket,
        "min_bucket_reso": ds.buckets.min_bucket_reso, "max_bucket_reso": ds.buckets.max_bucket_reso,
        "base_model_version": family_version, "v2": family_version.startswith("sd_v2"),
        "v_parameterization": family_version.endswith("_v"), "sd_model_name": model_name,
        "clip_skip": tcfg.clip_skip, "max_token_length": tcfg.max_token_length,
        "masked_loss": data.cache.has_masks, "epoch": epoch, **kohya_training_metadata(tcfg, data.cache),
        "tag_frequency": tags, "flip_aug": any(s.flip_aug for s in ds.subsets),
        # kohya keys with a fixed value in Kiln (README, "Metadata"): latents are always cached, LoRA weights stay fp32,
        # no weight-norm scaling, face crops or comment; not trained by sd-scripts
        "session_id": tcfg.session_id, "training_started_at": tcfg.training_started_at, "full_fp16": False,
        "cache_latents": True, "lowram": False, "training_comment": None, "sd_scripts_commit_hash": None,
        "face_crop_aug_range": None, "scale_weight_norms": None, "fp8_base": tcfg.fp8_base, "fp8_base_unet": tcfg.fp8_base_unet,
        "resize_interpolation": None,
        "dataset_dirs": {os.path.basename(s.image_dir.rstrip("/")): {"n_repeats": s.num_repeats,
                         "img_count": sum(1 for i in ds.items if i.subset == k)} for k, s in enumerate(ds.subsets)},
        **dataset_metadata(ds), **(family_meta or {}),
    }
    meta = build_metadata(arch, base, model_name or ("kiln lora" if lcfg else "kiln model"), lora=lcfg is not None)
    # which encoder trained at which rate (kohya's ss_text_encoder_lr does not say; lr1 = CLIP-L, lr2 = CLIP-G, lr3 = T5)
    meta["kiln_text_encoder_lrs"] = json.dumps(tcfg.group_lrs)
    meta["kiln_probe_loss_start"] = repr(result.probe_loss_start)
    meta["kiln_probe_loss_end"] = repr(result.probe_loss_end)
    meta["kiln_seconds_per_step"] = f"{result.seconds_per_step:.4f}"
    meta["kiln_world_size"] = str(distributed.world())  # processes that trained it (torchrun), each on batch_size
    if tcfg.diff_output_preservation:
        meta["kiln_diff_output_preservation"] = json.dumps({"multiplier": tcfg.diff_output_preservation_multiplier,
                                                            "pairs": tcfg.preservation_pairs})
    if tcfg.ema_decay:  # the weights in the file are the average (ema.py)
        meta["kiln_ema_decay"] = repr(tcfg.ema_decay)
        meta["kiln_ema_update_every"] = str(tcfg.ema_update_every)
        meta["kiln_ema_warmup"] = str(tcfg.ema_warmup)
    if result.validation:  # kohya logs it to trackers only; here it travels with the LoRA: [[step, loss], ...]
        meta["kiln_validation_loss"] = json.dumps([[s, round(v, 6)] for s, v in result.validation])
    return meta


def training_args_input(family: str) -> io.String.Input:
    return io.String.Input("training_args", default="", multiline=True, optional=True,
                           tooltip="More kohya options as key=value, one per line (kohya's names and meaning), "
                                   "e.g. max_train_epochs=10. Keys:\n" + describe_training_args(family))


def train_schema(node_id: str, display_name: str, description: str, inputs: list, family: str) -> io.Schema:
    """The schema every Train node shares: MODEL, CLIP, dataset and LoRA config in, the same outputs;
    ``training_args`` comes last, so workflows saved before it existed keep their widget values."""
    return io.Schema(
        node_id=node_id, display_name=display_name, category="Kiln", description=description,
        inputs=[io.Model.Input("model"), io.Clip.Input("clip"), KilnDatasetType.Input("dataset"),
                KilnLoraConfigType.Input("lora_config")] + inputs + [training_args_input(family)],
        outputs=train_outputs(), hidden=[io.Hidden.unique_id, io.Hidden.prompt], not_idempotent=False)


VERBOSE = {"verbose": "list every module and its rank in the node's output text (True/False)"}
LORAPLUS_ARGS = {k: v for k, v in BLOCK_ARGS.items() if k.startswith("loraplus")}


@dataclass
class FamilyPlan:
    """What a Train node decides for its family; ``run_training`` does the rest the same way for all."""
    node: str                                    # display name, for messages
    rules: Callable[[nn.Module], list]           # network -> TargetRules
    namer: Callable[[nn.Module], Callable[[str], str]]
    checkpoint_blocks: Callable[[nn.Module], list]
    architecture: Callable[[nn.Module], str]     # modelspec.architecture
    version: str                                 # ss_base_model_version
    objective: object
    conditioning: TextConditioning
    te_prefixes: dict = field(default_factory=dict)   # encoder ("clip_l", ...) -> kohya prefix ("lora_te1")
    te_lrs: dict = field(default_factory=dict)        # encoder -> learning rate; 0 or missing = not trained
    network_args: dict = field(default_factory=lambda: dict(VERBOSE))  # network_args keys this family reads
    while_training: Callable = lambda network, seed: contextlib.nullcontext()  # e.g. SD3.5's pos-embed crops
    hidden_only: tuple = ()  # encoders whose pooled output the family ignores: clip skip leaves their last layers out
    blocks: BlockPlan | None = None              # kohya's block-wise ranks / learning rates (SD1, SDXL)
    is_sdxl: bool = False                        # which block numbering ``blocks`` uses
    metadata: dict = field(default_factory=dict)  # ss_* keys kohya's trainer for this family adds (update_metadata)
    network_module: str = "networks.lora"        # kohya's module for this family (ss_network_module)


def unet_blocks(lc: LoraConfig, is_sdxl: bool) -> BlockPlan | None:
    return block_plan(parse_network_args(lc.args), is_sdxl, lc.rank, lc.alpha, lc.conv_rank, lc.conv_alpha)


def unet_conv_rank(lc: LoraConfig, blocks: BlockPlan | None) -> int:
    """conv_block_dims alone also puts adapters on the 3x3 convs (kohya)."""
    return lc.conv_rank or (blocks.max_conv_dim if blocks else 0)


def train_config(model, dataset: KilnDataset, opts: dict, args: dict) -> TrainConfig:
    precision = cmodel.default_precision(model) if opts["precision"] == "auto" else opts["precision"]
    return TrainConfig(**args, steps=opts["steps"], learning_rate=opts["learning_rate"], batch_size=dataset.dataset.batch_size,
                       grad_accum=opts["grad_accum"], optimizer=opts["optimizer"], lr_scheduler=opts["lr_scheduler"],
                       warmup_steps=opts["warmup_steps"], max_grad_norm=opts["max_grad_norm"], seed=opts["seed"],
                       loss_type=opts["loss_type"], min_snr_gamma=opts.get("min_snr_gamma", 0.0),
                       mask_normalize=opts["mask_normalize"], prior_loss_weight=opts["prior_loss_weight"],
                       precision=precision, gradient_checkpointing=opts["gradient_checkpointing"])


DEFAULT_SAVE_NAME = "kiln/checkpoint"


def save_name_of(opts: dict) -> str:
    return (opts.get("save_name") or DEFAULT_SAVE_NAME).strip()


def check_paths(opts: dict, node: str) -> None:
    """save_name and resume_from, before any work: a bad name fails at once, not at the first save."""
    check_text(opts.get("save_name") or "", node, "save_name")
    if opts.get("save_every_n_steps", 0):
        lora_output_path(f"{save_name_of(opts)}-step000001", node, "save_name")
    resume = opts.get("resume_from") or ""
    check_text(resume, node, "resume_from")
    if resume.strip() and resume_path(resume) is None:
        raise KilnError(f"{node}: resume_from {resume.strip()!r} is not a file in models/loras. Give the name as "
                        f"Load LoRA lists it, e.g. kiln/checkpoint-step000500.safetensors, or leave it empty.")


def check_save_nodes(prompt: dict | None, node_id, node: str) -> list[str]:
    """The Save LoRA nodes fed by this Train node, where their filename is a constant: a name that cannot be
    saved stops the run now, not after training (ComfyUI would still train for the other outputs). Returns
    their target paths (their free space is checked once the LoRA's size is known)."""
    targets = []
    for nid, n in (prompt or {}).items():
        inputs = n.get("inputs", {}) if isinstance(n, dict) else {}
        link = inputs.get("lora")
        if n.get("class_type") != "KilnSaveLora" or not (isinstance(link, list) and str(link[0]) == str(node_id)):
            continue
        name = inputs.get("filename")
        problem = check_output_file(name, "Save LoRA", "filename", inputs.get("overwrite") is not False) \
            if isinstance(name, str) else None
        if problem:
            raise KilnError(f"{node}: the Save LoRA node ({nid}) this node feeds cannot save, so training would be "
                            f"lost: {problem}")
        if isinstance(name, str):
            targets.append(lora_output_path(name, "Save LoRA", "filename"))
    return targets


def intermediate_series(save_name: str, node: str, kind: str = "loras") -> tuple[str, list[str]]:
    """(folder, files of the ``<save_name>-stepNNNNNN`` series already there: LoRAs or checkpoints, and states)."""
    folder = os.path.dirname(lora_output_path(f"{save_name}-step000001", node, "save_name", kind))
    stem = re.escape(os.path.basename(save_name))
    pattern = re.compile(rf"^{stem}-step\d+(\.safetensors|{re.escape(SUFFIX)})$")
    return folder, sorted(f for f in os.listdir(folder) if pattern.match(f)) if os.path.isdir(folder) else []


def unique_save_name(save_name: str, resume_file: str | None, node: str, notes: list, kind: str = "loras") -> str:
    """``save_name``, unless another run's intermediate saves are there: then the first free ``save_name_N``
    (said in ``notes``), so one run never silently replaces another's checkpoints. A run resumed from one of
    that series continues it."""
    folder, files = intermediate_series(save_name, node, kind)
    if not files or (resume_file and os.path.realpath(os.path.dirname(resume_file)) == os.path.realpath(folder)
                     and os.path.basename(resume_file) in files):
        return save_name
    n = 2
    while intermediate_series(f"{save_name}_{n}", node, kind)[1]:
        n += 1
    new = f"{save_name}_{n}"
    notes.append(f"save_name {save_name}: {files[0]} and others belong to another run and are kept; this run's "
                 f"intermediate saves are {new}-stepNNNNNN")
    log.warning("kiln: %s: %s", node, notes[-1])
    return new


class TrainNode(io.ComfyNode):
    """What the Train nodes share beyond their schema: checks run when the prompt is queued."""

    @classmethod
    def validate_inputs(cls, save_every_n_steps=None, save_name=None, resume_from=None):
        node = cls.define_schema().display_name
        try:
            check_paths({"save_every_n_steps": save_every_n_steps or 0, "save_name": save_name,
                         "resume_from": resume_from}, node)
        except KilnError as e:
            return str(e)
        if save_every_n_steps and save_name is not None:
            return check_output_file(f"{save_name_of({'save_name': save_name})}-step000001", node, "save_name") or True
        return True


def prepare(model, dataset: KilnDataset, opts: dict, families: tuple[str, ...], node: str,
            cls=None, family: str = "sd1") -> tuple[str, TrainConfig]:
    """What every Train node checks first (option values, paths, training_args, the model's family, cached
    latents) and its TrainConfig (steps from max_train_epochs when given)."""
    if cls is not None:
        check_options(cls, node, opts)
        opts["_save_targets"] = check_save_nodes(cls.hidden.prompt, cls.hidden.unique_id, node)
    check_paths(opts, node)
    fam = cmodel.require_family(model, families, node)
    if dataset.cache is None:
        raise KilnError(f"{node}: the dataset has no cached latents. Connect Load Dataset → "
                        "(Alpha/Mask Source →) Cache Latents → this node's dataset input.")
    args = parse_training_args(opts.get("training_args") or "", family, node)
    if opts["loss_type"] not in ("huber", "smooth_l1") and {"huber_c", "huber_scale", "huber_schedule"} & set(args):
        raise KilnError(f"{node}: training_args huber_* apply to loss_type huber or smooth_l1 only (loss_type is "
                        f"{opts['loss_type']}).")
    tcfg = train_config(model, dataset, opts, args)
    if tcfg.cpu_offload_checkpointing and not tcfg.gradient_checkpointing:
        raise KilnError(f"{node}: training_args cpu_offload_checkpointing needs gradient_checkpointing on (it keeps "
                        f"the checkpointed blocks' inputs in host memory): turn gradient_checkpointing on, or remove it.")
    for key in ("fp8_base", "fp8_base_unet"):
        if getattr(tcfg, key):
            cmodel.check_fp8_base(model, node, key)
    if cmodel.weight_dtype(model) in cmodel.FP8_DTYPES and not tcfg.fp8_base:
        tcfg.fp8_base_unet = True  # the metadata says what kohya's would: the diffusion model trained in fp8
    if family == "sd3" and "huber_schedule" not in args:
        tcfg.huber_schedule = "constant"  # kohya's default (snr) needs a DDPM schedule and fails on SD3
    resolve_epochs(tcfg, validation.parts(dataset.cache, tcfg)[0])
    if tcfg.diff_output_preservation:
        try:
            tcfg.preservation_pairs = pairs_from(dataset.dataset.subsets, tcfg.diff_output_preservation_trigger,
                                                 tcfg.diff_output_preservation_class)
        except KilnError as e:
            raise KilnError(f"{node}: {e}") from None
    tcfg.training_args = args
    tcfg.session_id = random.randint(0, 2 ** 32)  # kohya's ss_session_id: one random number per run
    tcfg.training_started_at = time.time()
    return fam, tcfg


def ddpm_objective(model, is_v: bool, tcfg: TrainConfig) -> sd1.SD1Objective:
    """SD1/SDXL objective with the model's schedule and kohya's timestep, noise and zero_terminal_snr options."""
    return sd1.SD1Objective(cmodel.alphas_cumprod(model), "v" if is_v else "eps", tcfg.min_timestep,
                            tcfg.max_timestep, NoiseOptions.from_config(tcfg), tcfg.zero_terminal_snr)


def caption_conditioning(cond: TextConditioning, dataset: KilnDataset, te_train: list[str], opts: dict,
                         node: str) -> tuple[Callable[..., dict], set[str]]:
    """The loop's ``conditioning`` callable over ``cond`` and the set of distinct captions it trained on.
    Trained text encoders (``te_train``) encode every caption again at every step; otherwise fixed captions are
    encoded once, before the loop (or read from the disk cache), and augmented ones on demand."""
    cond.live = bool(te_train)
    if opts.get("cache_text_encoder_outputs_to_disk"):
        varying = next((s for s in dataset.cache.samples if s.captions.varies), None)
        if te_train or varying is not None:
            why = (f"the text encoders are being trained ({', '.join(te_train)} learning rate > 0)" if te_train else
                   f"caption augmentation is on (e.g. for {os.path.dirname(varying.path)})")
            raise KilnError(f"{node}: cache_text_encoder_outputs_to_disk cannot be used because {why}: the "
                            f"outputs differ at every step. Turn the option off, or set the text-encoder learning "
                            f"rates to 0 and switch off shuffle_caption / caption dropout.")
        cond.use_disk(DiskStore(default_cache_folder("text"), redo="encoding its caption again"))
    if not cond.live:
        for s in dataset.cache.samples:
            if not s.captions.varies:
                cond.encode(base_caption(s.caption, s.captions), pin=True)
    seen: set[str] = set()

    def conditioning(captions: list[str], train: bool = False, geometries=None) -> dict[str, torch.Tensor]:
        if train:
            seen.update(captions)
        return cond(captions, train=train, geometries=geometries)
    return conditioning, seen


def step_reporter(progress: Progress, tcfg: TrainConfig, opts: dict, epochs: int,
                  preview: Callable[[], object], tracker: TensorBoardLog | None = None) -> Callable[[StepInfo], None]:
    """The loop's ``on_step``: progress (with a preview image every ``sample_every`` steps, or every
    ``sample_every_n_epochs`` epochs as kohya), the loss chart's event, and TensorBoard when logging_dir is set."""
    every = opts["sample_every"]

    def on_step(info: StepInfo) -> None:
        image = None
        by_epoch = tcfg.sample_every_n_epochs  # kohya: overrides the step interval
        due = (info.epoch_end and info.epoch % by_epoch == 0) if by_epoch else (every and info.step % every == 0)
        if due and info.step < info.total:
            with info.averaged():  # with EMA on, the preview shows the average, as the saves hold it
                image = preview()
        progress.update(info.step, image)
        if tracker is not None:
            tracker.step(info)
            if image is not None:
                tracker.image(f"step {info.step}", image, info.step)
        progress.send("kiln.loss", {"step": info.step, "total": info.total, "loss": info.loss, "lr": info.lr,
                                    "seconds": info.seconds, "epoch": info.epoch, "epochs": epochs,
                                    "val_loss": info.val_loss, "saved": info.saving})
    return on_step


def prompt_file_path(text: str, node: str) -> str:
    """A prompt file named in sample_prompts: absolute, or inside ComfyUI's input folder (confined like datasets)."""
    name = text.strip()
    path = name if os.path.isabs(name) else os.path.join(folder_paths.get_input_directory(), name)
    check_inside(path, confinement(), f"{node}: sample_prompts")
    if not os.path.isfile(path):
        raise KilnError(f"{node}: sample_prompts names the prompt file {path}, which does not exist (relative paths "
                        f"are read inside ComfyUI's input folder).")
    return path


def preview_specs(opts: dict, tcfg: TrainConfig, dataset: KilnDataset, node: str, notes: list) -> list[PreviewSpec]:
    """The sample previews: sample_prompts lines (or a kohya prompt file) with kohya's --n/--w/--h/--d/--s/--l/--ss,
    the node's widgets for what a line does not set (seed + line number, the first bucket's size), the first
    caption when there are none."""
    text = opts.get("sample_prompts") or ""
    try:
        prompts = (load_prompt_file(prompt_file_path(text, node), notes) if is_prompt_file(text)
                   else parse_sample_prompts(text, notes))
    except KilnError as e:
        raise KilnError(f"{node}: {e}") from None
    first = dataset.cache.samples[0]
    width, height = first.geometry.bucket
    default_sampler = comfy_sampler(tcfg.sample_sampler, node) if tcfg.sample_sampler else ("euler", "normal")
    if not prompts:
        prompts = [SamplePrompt(base_caption(first.caption, first.captions))]
    specs = []
    for i, p in enumerate(prompts):
        sampler, scheduler = comfy_sampler(p.sampler, node) if p.sampler else default_sampler
        if not known_sampler(sampler, scheduler):
            raise KilnError(f"{node}: this ComfyUI has no sampler {sampler!r} / scheduler {scheduler!r} (kohya's "
                            f"{p.sampler or tcfg.sample_sampler}); choose another sample_sampler.")
        specs.append(PreviewSpec(p.prompt, opts.get("sample_negative", "") if p.negative is None else p.negative,
                                 p.width or width, p.height or height, tcfg.seed + i if p.seed is None else p.seed,
                                 p.steps or opts["sample_steps"], opts["sample_cfg"] if p.cfg is None else p.cfg,
                                 sampler, scheduler))
    if len({(s.width, s.height) for s in specs}) > 1:
        notes.append("sample previews of different sizes: the samples output places each top-left on the largest "
                     "size (one IMAGE batch has one size)")
    return specs


def caption_length_notes(cond: TextConditioning, dataset: KilnDataset, tcfg: TrainConfig, node: str) -> list[str]:
    """One warning per caption longer than max_token_length, naming its file and the tokens lost (kohya cuts
    them silently), and, when max_token_length is set, the longest caption's length."""
    notes, longest = [], 0
    for path, caption in {s.path: base_caption(s.caption, s.captions) for s in dataset.cache.samples}.items():
        length = cond.token_count(caption)
        if length is None:
            return []
        longest = max(longest, length)
        lost = length - cond.token_limit
        if lost > 0:
            notes.append(f"the caption of {path} is {lost} token{'s' if lost != 1 else ''} longer than "
                         f"max_token_length ({cond.token_limit}); they are not trained (set max_token_length=150 "
                         f"or 225 in training_args, or shorten the caption)")
            log.warning("kiln: %s: %s", node, notes[-1])
    if tcfg.max_token_length:
        notes.append(f"max_token_length {tcfg.max_token_length}: the longest caption has {longest} tokens")
    return notes


def run_training(model, clip, dataset: KilnDataset, lora_config: LoraConfig, tcfg: TrainConfig, plan: FamilyPlan,
                 opts: dict, node_id, family: str) -> io.NodeOutput:
    """Train on the shared MODEL (and CLIP, for text-encoder LoRA) in place, report progress, and return the
    node's outputs."""
    args = parse_network_args(lora_config.args)
    check_keys(args, plan.network_args, plan.node)
    loaded = text_encoder_names(clip)
    te_train = [e for e in loaded if plan.te_lrs.get(e, 0) > 0]
    notes = [f"{e} is not in this CLIP: its text-encoder learning rate is ignored"
             for e, lr in plan.te_lrs.items() if lr > 0 and e not in loaded and e in plan.te_prefixes]
    tcfg.group_lrs = {e: plan.te_lrs[e] for e in te_train}
    previews = preview_specs(opts, tcfg, dataset, plan.node, notes)
    cond = plan.conditioning
    conditioning, seen = caption_conditioning(cond, dataset, te_train, opts, plan.node)
    notes += caption_length_notes(cond, dataset, tcfg, plan.node)

    cache = normal_cache(dataset.cache)
    progress = Progress(tcfg.steps, node_id)
    per_epoch = steps_per_epoch(validation.parts(cache, tcfg)[0], tcfg.batch_size, tcfg.grad_accum)
    epochs = math.ceil(tcfg.steps / per_epoch)

    te_session = text_encoder_session(clip, plan.node) if te_train else contextlib.nullcontext()
    with cmodel.training_session(model, plan.node) as target, te_session as te_target, \
            plan.while_training(target.network, tcfg.seed):
        net_host, encoders = target.network, te_target.network if te_target else None
        notes += [t.note for t in (target, te_target) if t is not None and t.note]
        if te_target is not None:
            cond.clip = te_target.patcher  # encode through the CLIP that trains (itself, or its dynamic-VRAM copy)

        main = distributed.is_main()  # under torchrun only rank 0 samples and writes; the others only train

        def preview(net: LoRANetwork) -> torch.Tensor:
            if not main:
                return torch.zeros((1, 8, 8, 3))
            net.eval()
            images = sample_images(target.patcher, cond, dataset.vae, previews)
            net.train()
            return images

        blocks = plan.blocks
        rank_of = (lambda name, conv, r, a: blocks.rank_of(name, plan.is_sdxl, conv, r, a)) if blocks else None
        network = LoRANetwork(net_host, plan.rules(net_host), plan.namer(net_host), seed=tcfg.seed, rank_of=rank_of,
                              **lora_config.check(plan.node).network_kwargs())
        if blocks and blocks.lr_weights:
            network.block_lr = lambda name: block_lr_of(name, blocks, plan.is_sdxl)
        plus_unet, plus_te = loraplus_ratios(args)
        network.plus = {k: v for k, v in (("unet", plus_unet), ("text_encoder", plus_te)) if v}
        if network.plus and lora_config.algorithm in ("loha", "lokr"):
            notes.append(f"LoRA+ ratios act on lora_up matrices; {lora_config.algorithm} has none, so they change "
                         f"nothing (as in kohya with LyCORIS)")
        for e in te_train:
            last = last_layer_reached(clip, e) if e in plan.hidden_only else None
            network.add(encoders, te_rules([e], lora_config.rank, lora_config.alpha, None if last is None else {e: last}),
                        te_namer(plan.te_prefixes), e)
        if not len(network):
            raise KilnError(f"{plan.node}: no layer got a LoRA; check rank and network_args "
                            f"({lora_config.args or 'none'}).")
        signature = {"seed": tcfg.seed, "samples": len(cache.samples),
                     "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum, "modules": len(network),
                     "algorithm": lora_config.algorithm}
        resume = resume_network(network, opts.get("resume_from", ""), signature, plan.node, notes)
        tcfg.save_every = opts.get("save_every_n_steps", 0)
        save_name = save_name_of(opts)
        lora_bytes = sum(p.numel() * 4 for p in network.parameters())  # fp32, the largest Save LoRA writes
        for save_path in opts.get("_save_targets", []):
            check_writable(os.path.dirname(save_path), lora_bytes, f"{plan.node}: the Save LoRA node's filename",
                           "Free disk space or choose another filename, so the trained LoRA can be saved.")
        if tcfg.save_every or tcfg.save_every_n_epochs:
            resume_file = resume_path(opts.get("resume_from") or "") if (opts.get("resume_from") or "").strip() else None
            save_name = unique_save_name(save_name, resume_file, plan.node, notes)
            need = 4 * lora_bytes  # the folder is writable and has room for a LoRA + its state (about 4x the weights)
            check_writable(os.path.dirname(lora_output_path(f"{save_name}-step000001", plan.node, "save_name")),
                           need, f"{plan.node}: save_name", "Choose another save_name, free disk space, or set "
                           "save_every_n_steps to 0.")

        def intermediate_path(step: int, epoch: int | None) -> str:  # kohya's names: NAME-000004 (epoch), NAME-stepNNNNNN
            return lora_output_path(f"{save_name}-{epoch:06d}" if epoch else f"{save_name}-step{step:06d}", plan.node)

        def on_save(step: int, state: dict, so_far, epoch: int | None = None) -> None:
            path = intermediate_path(step, epoch)
            meta = training_metadata(plan.version, plan.architecture(net_host), dataset, lora_config, tcfg, so_far, "",
                                     state["batches"]["epoch"], plan.metadata,
                                     plan.network_module)
            save_lora_file(path, network.kohya_state_dict(), meta)
            save_state(path, state, signature)
            log.info("kiln: %s step %d: saved %s (+ %s)", plan.node, step, path, SUFFIX)
            old = (epoch_save_to_remove(epoch, tcfg.save_every_n_epochs, tcfg.save_last_n_epochs) if epoch else
                   step_save_to_remove(step, tcfg.save_every, tcfg.save_last_n_steps))
            if old:  # kohya's save_last_n_epochs / save_last_n_steps: the older intermediate file goes
                remove_save(intermediate_path(old, old if epoch else None))
        swap_blocks = plan.checkpoint_blocks(net_host)
        with network.attached(), block_swap(swap_blocks, tcfg.blocks_to_swap, cmodel.device_of(model)) as swap, \
                tensorboard_log(tcfg, plan.node) as tracker:
            on_step = step_reporter(progress, tcfg, opts, epochs, lambda: to_pil(preview(network)[0]), tracker)
            if tcfg.sample_at_first:  # kohya's sample_at_first: a preview of the model before the first step
                progress.update(0, to_pil(preview(network)[0]))
            result = train(network, plan.objective, cmodel.unet_forward(target.patcher, net_host), conditioning,
                           cache, cmodel.latent_in(model), tcfg, cmodel.device_of(model), swap_blocks,
                           on_step, on_save if main else None, resume)
            samples = preview(network)
            if tracker is not None:
                tracker.image("final", to_pil(samples[0]), result.steps)
            if swap is not None:
                notes.append(f"blocks_to_swap {tcfg.blocks_to_swap}: {len(swap.swapped)} of {len(swap_blocks)} blocks "
                             f"kept in host memory ({swap.freed_bytes / 2 ** 20:.0f} MiB off the device), "
                             f"{swap.transfers} block transfers")
        cond.live, cond.clip = False, clip
        lora_sd = network.kohya_state_dict()
        arch = plan.architecture(net_host)

    meta = training_metadata(plan.version, arch, dataset, lora_config, tcfg, result, "", epochs, plan.metadata,
                             plan.network_module)
    meta["kiln_distinct_captions"] = str(len(seen))
    meta["kiln_text_encoder_calls"] = str(cond.encodes)
    meta["kiln_text_encoder_outputs_from_disk"] = str(cond.from_disk)
    groups = {g: sum(1 for n in network.groups.values() if n == g) for g in dict.fromkeys(network.groups.values())}
    label = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}[lora_config.algorithm]
    unmapped = cmodel.unmapped_lora_keys(model, lora_sd, clip)
    if unmapped:  # a bug if it ever happens: say so rather than ship a file ComfyUI half-applies
        log.warning("kiln: %d LoRA modules do not map onto this model in ComfyUI, e.g. %s", len(unmapped), unmapped[0])
        notes.append(f"{len(unmapped)} modules do not map in ComfyUI, e.g. {unmapped[0]}")
    text = run_summary(f"{len(network)} {label} modules ({', '.join(f'{g} {k}' for g, k in groups.items())})",
                       f"{len(seen)} distinct captions trained, {cond.encodes} text-encoder calls; {epochs} "
                       f"epoch{'s' if epochs != 1 else ''} of {per_epoch} steps", result, tcfg, notes)
    if bool_arg(args, "verbose"):
        if plan.blocks:
            text += "\n" + block_table(network, plan.blocks, plan.is_sdxl, tcfg.learning_rate)
        text += "\n" + describe_modules(network)
    lora = TrainedLora(lora_sd, meta, family)
    model_out, clip_out = cmodel.apply_lora(model, clip, lora_sd)
    return io.NodeOutput(model_out, lora, samples, loss_image(result), clip_out, ui=ui.PreviewText(text))


def run_summary(head: str, details: str, result, tcfg: TrainConfig, notes: list[str]) -> str:
    """The text every Train node shows when it finishes: what trained, how fast, whether it learned, and why
    anything differed from what was asked."""
    text = (f"{head}, {result.steps} steps in {result.seconds:.1f}s ({result.seconds_per_step:.3f}s/step); probe loss "
            f"{result.probe_loss_start:.4f} → {result.probe_loss_end:.4f}; {details}")
    if result.validation:
        text += f"; validation loss {result.validation[0][1]:.4f} → {result.validation[-1][1]:.4f}"
    if tcfg.training_args:
        text += f"\ntraining_args: {effective(tcfg.training_args)}"
    return text + "".join(f"\nnote: {n}" for n in notes + result.notes)


def loss_image(result: TrainResult) -> torch.Tensor:
    """The loss_plot IMAGE of both Train nodes: loss, smoothed loss, learning rate, validation points, saves."""
    return pil_to_image(loss_plot(result.losses, validation=result.validation, lrs=result.lrs, saves=result.saves))


def resume_path(name: str, kind: str = "loras") -> str | None:
    name = name.strip()
    return folder_paths.get_full_path(kind, name) or folder_paths.get_full_path(kind, name + ".safetensors")


def resume_network(network: LoRANetwork, name: str, signature: dict, node: str, notes: list) -> dict | None:
    """Load ``resume_from``'s adapters into ``network``; return its training state when it can be resumed
    exactly (notes say which it was)."""
    name = (name or "").strip()
    if not name:
        return None
    path = resume_path(name)
    if path is None:
        raise KilnError(f"{node}: resume_from {name!r} is not a file in models/loras. Give the name as Load LoRA "
                        f"lists it, e.g. kiln/checkpoint-step000500.safetensors, or leave it empty.")
    sd, _ = load_lora_file(path)
    try:
        network.load_kohya_state_dict(sd)
    except (KeyError, RuntimeError, ValueError) as e:
        raise KilnError(f"{node}: {name} does not fit this LoRA ({e}); resume with the same rank, targets, "
                        f"network_args and text-encoder settings it was trained with.") from None
    state, note = load_state(path, signature)
    notes.append(f"resume_from {name}: {note}")
    return state


def block_lr_of(name: str, blocks: BlockPlan, is_sdxl: bool) -> tuple[str, float]:
    i = block_index(name, is_sdxl)
    return ("unet", 1.0) if i < 0 else (f"unet_block{i}", blocks.lr_weights[i])


def block_table(network: LoRANetwork, blocks: BlockPlan, is_sdxl: bool, lr: float) -> str:
    """kohya's block-wise settings as they landed: per block, its modules, ranks, alphas and learning rate."""
    rows: dict[int, list] = {}
    for name, a in network.adapters.items():
        if network.groups[name] == "unet":
            rows.setdefault(block_index(name, is_sdxl), []).append(a)
    lines = [f"{'block':>5}  {'where':<16} {'modules':>7}  {'rank':<8} {'alpha':<10} lr"]
    for i in range(total_blocks(is_sdxl)):
        adapters = rows.get(i, [])
        weight = blocks.lr_weights[i] if blocks.lr_weights else 1.0
        ranks = "/".join(str(r) for r in sorted({a.rank for a in adapters})) or "-"
        alphas = "/".join(f"{x:g}" for x in sorted({a.alpha for a in adapters})) or "-"
        lines.append(f"{i:>5}  {block_name(i, is_sdxl):<16} {len(adapters):>7}  {ranks:<8} {alphas:<10} "
                     f"{lr * weight:.3g} (×{weight:g})")
    return "\n".join(lines)


def describe_modules(network: LoRANetwork) -> str:
    """Which layer got which rank (kohya's verbose listing), for the node's output text."""
    rows = [(name, a.algorithm, a.rank, a.alpha) for name, a in network.adapters.items()]
    width = max(len(n) for n, *_ in rows)
    return "\n".join(f"{n:{width}}  rank {r}, alpha {a:g}" + ("" if algo == "lora" else f" ({algo})")
                     for n, algo, r, a in rows)


class KilnTrainSD1(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainSD1", "Train LoRA (SD1)",
            "Trains a LoRA on the loaded SD 1.x/2.x model in place (no second copy), with live loss and samples.",
            common_inputs() + [te_lr_input("text_encoder_lr", "text encoder")], "sd1")

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (SD1)"
        fam, tcfg = prepare(model, dataset, opts, cmodel.SD1_FAMILIES, node, cls, "sd1")
        clip, tcfg.clip_skip = with_clip_skip(clip, tcfg.clip_skip, node)  # training, previews and the clip output
        is_v = cmodel.prediction_type(model, node) == "v"
        is_sd2 = fam not in ("SD15", "SD15_instructpix2pix")
        lc = lora_config
        blocks = unet_blocks(lc, False)
        plan = FamilyPlan(
            node=node, blocks=blocks, is_sdxl=False, network_args={**VERBOSE, **BLOCK_ARGS},
            rules=lambda unet: sd1.unet_rules(lc.rank, lc.alpha, unet_conv_rank(lc, blocks), lc.conv_alpha),
            namer=sd1.unet_namer, checkpoint_blocks=sd1.checkpoint_blocks,
            architecture=lambda unet: sd1.modelspec_architecture(is_v, is_sd2),
            version=("sd_v2" if is_sd2 else "sd_v1") + ("_v" if is_v else ""),
            objective=ddpm_objective(model, is_v, tcfg),
            conditioning=TextConditioning(clip, tcfg.max_token_length),
            te_prefixes={"clip_l": "lora_te", "clip_h": "lora_te"}, hidden_only=("clip_l", "clip_h"),
            te_lrs={"clip_l": opts.get("text_encoder_lr", 0.0), "clip_h": opts.get("text_encoder_lr", 0.0)})
        return run_training(model, clip, dataset, lora_config, tcfg, plan, opts, cls.hidden.unique_id, fam)


def sd3_inputs() -> list:
    """kohya's sd3_train_network options (same names)."""
    return [
        io.Combo.Input("weighting_scheme", options=list(sd3.WEIGHTING_SCHEMES), default="uniform",
                       tooltip="Timestep density (uniform, logit_normal, mode) or loss weighting (cosmap, sigma_sqrt)."),
        io.Float.Input("logit_mean", default=0.0, min=-10.0, max=10.0, step=0.1),
        io.Float.Input("logit_std", default=1.0, min=0.01, max=10.0, step=0.1),
        io.Float.Input("mode_scale", default=1.29, min=-10.0, max=10.0, step=0.01),
        io.Float.Input("training_shift", default=1.0, min=0.01, max=100.0, step=0.1,
                       tooltip=">1 samples noisier timesteps (structure), <1 cleaner ones (detail)."),
        io.Int.Input("t5xxl_max_token_length", default=256, min=1, max=512),
        io.Boolean.Input("apply_lg_attn_mask", default=False, tooltip="Zero CLIP-L/G outputs at padding tokens."),
        io.Boolean.Input("apply_t5_attn_mask", default=False, tooltip="Zero T5 outputs at padding tokens."),
        io.Float.Input("clip_l_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01),
        io.Float.Input("clip_g_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01),
        io.Float.Input("t5_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01),
        io.Float.Input("pos_emb_random_crop_rate", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="SD3.5: probability of a random (not centred) position-embedding crop per step."),
    ]


class KilnTrainSD3(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainSD3", "Train LoRA (SD3)",
            "Trains a LoRA on the loaded SD3 / SD3.5 model in place (rectified flow, kohya's SD3 options).",
            common_inputs(min_snr=False, sample_cfg=5.0) + sd3_inputs()
            + [te_lr_input("text_encoder_lr1", "CLIP-L"), te_lr_input("text_encoder_lr2", "CLIP-G"),
               te_lr_input("text_encoder_lr3", "T5-XXL")], "sd3")

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (SD3)"
        fam, tcfg = prepare(model, dataset, opts, cmodel.SD3_FAMILIES, node, cls, "sd3")
        args = parse_network_args(lora_config.args)
        depth = sd3.depth_of(model.model.diffusion_model)
        ranks = sd3.SD3LayerRanks.from_args(args, lora_config.rank, depth)
        conditioning = SD3TextConditioning(
            clip, opts["t5xxl_max_token_length"], opts["apply_lg_attn_mask"], opts["apply_t5_attn_mask"],
            {"clip_l": opts["clip_l_dropout_rate"], "clip_g": opts["clip_g_dropout_rate"], "t5": opts["t5_dropout_rate"]},
            tcfg.seed + 1_000_003 * distributed.rank())  # under torchrun: each rank drops encoders independently
        plan = FamilyPlan(
            node=node, rules=lambda mmdit: ranks.rules(lora_config.alpha), namer=lambda mmdit: sd3.unet_namer,
            checkpoint_blocks=sd3.checkpoint_blocks, architecture=sd3.modelspec_architecture,
            version=sd3.model_type(model.model.diffusion_model), network_module="networks.lora_sd3",
            objective=sd3.SD3Objective(opts["weighting_scheme"], opts["logit_mean"], opts["logit_std"],
                                       opts["mode_scale"], opts["training_shift"], tcfg.min_timestep or 0,
                                       1000 if tcfg.max_timestep is None else tcfg.max_timestep),
            conditioning=conditioning, network_args={**VERBOSE, **sd3.NETWORK_ARGS, **LORAPLUS_ARGS},
            te_prefixes=sd3.TE_PREFIXES,
            te_lrs={"clip_l": opts.get("text_encoder_lr1", 0.0), "clip_g": opts.get("text_encoder_lr2", 0.0),
                    "t5xxl": opts.get("text_encoder_lr3", 0.0)},
            while_training=lambda mmdit, seed: cmodel.random_pos_embed_crop(mmdit, opts["pos_emb_random_crop_rate"], seed),
            metadata={k: opts[k] for k in ("apply_lg_attn_mask", "apply_t5_attn_mask", "weighting_scheme", "logit_mean",
                                           "logit_std", "mode_scale")})  # sd3_train_network.update_metadata
        return run_training(model, clip, dataset, lora_config, tcfg, plan, opts, cls.hidden.unique_id, fam)


class KilnTrainSDXL(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainSDXL", "Train LoRA (SDXL)",
            "Trains a LoRA on the loaded SDXL-family model (SDXL, SSD-1B, Vega, KOALA) in place, with "
            "both text encoders and the size/crop conditioning from bucketing.",
            common_inputs() + [te_lr_input("text_encoder_lr1", "CLIP-L"), te_lr_input("text_encoder_lr2", "CLIP-G")],
            "sdxl")

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (SDXL)"
        fam, tcfg = prepare(model, dataset, opts, cmodel.SDXL_FAMILIES, node, cls, "sdxl")
        is_v = cmodel.prediction_type(model, node) == "v"
        lc = lora_config
        blocks = unet_blocks(lc, True)
        plan = FamilyPlan(
            node=node, blocks=blocks, is_sdxl=True, network_args={**VERBOSE, **BLOCK_ARGS},
            rules=lambda unet: sdxl.unet_rules(lc.rank, lc.alpha, unet_conv_rank(lc, blocks), lc.conv_alpha),
            namer=sdxl.unet_namer, checkpoint_blocks=sdxl.checkpoint_blocks,
            architecture=lambda unet: sdxl.ARCHITECTURE, version=sdxl.BASE_MODEL_VERSION + ("_v" if is_v else ""),
            objective=ddpm_objective(model, is_v, tcfg),
            conditioning=SDXLTextConditioning(clip, model, tcfg.max_token_length), te_prefixes=sdxl.TE_PREFIXES, hidden_only=("clip_l",),
            te_lrs={"clip_l": opts.get("text_encoder_lr1", 0.0), "clip_g": opts.get("text_encoder_lr2", 0.0)})
        return run_training(model, clip, dataset, lora_config, tcfg, plan, opts, cls.hidden.unique_id, fam)
