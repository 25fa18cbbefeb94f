"""One run skeleton for every Train node: checks → training session → previews → trainable → saver →
tracker → train → summary. A family supplies a FamilyPlan (what to train through and how); what differs between
a LoRA and a fully fine-tuned model (how it is built, resumed, saved and sized) is a Trainable
(lora_training.py, dreambooth_nodes.py). Nothing here is written twice for one kind of run."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

import folder_paths

from ..trainer_core.training import distributed, validation
from ..trainer_core.options import registry
from ..trainer_core.files.atomic import check_writable
from ..trainer_core.memory.block_swap import block_swap
from ..trainer_core.data.cache import LatentCache
from ..trainer_core.data.captions import base_caption
from ..trainer_core.data.confine import check_inside
from ..trainer_core.training.epochs import epoch_save_to_remove, resolve_epochs, step_save_to_remove, steps_per_epoch
from ..trainer_core.errors import KilnError
from ..trainer_core.families import layer
from ..trainer_core.kohya.metadata import training_metadata
from ..trainer_core.data.latent_store import DiskStore
from ..trainer_core.training.events import planned_previews, planned_saves, preview_due
from ..trainer_core.training.loop import StepInfo, TrainConfig, TrainResult, train
from ..trainer_core.lora.blocks import BlockPlan
from ..trainer_core.lora.io import DTYPES, KOHYA
from ..trainer_core.report.plot import loss_plot
from ..trainer_core.maths.preservation import pairs_from
from ..trainer_core.files.resume import SUFFIX, state_path
from ..trainer_core.kohya.sample_prompts import SamplePrompt, comfy_sampler, is_prompt_file, load_prompt_file, \
    parse_sample_prompts
from ..trainer_core.report.tracking import TensorBoardLog, tensorboard_log
from ..trainer_core.options.training_args import effective, parse_training_args
from .comfy import model as cmodel
from .comfy.preview import PreviewSpec, known_sampler, pil_to_image, sample_images, to_pil
from .comfy.progress import Progress
from .run_clock import RunClock
from .comfy.tensors import normal_tensor
from .comfy.text import TextConditioning, text_encoder_names, text_encoder_session
from .dataset_nodes import confinement, default_cache_folder
from .lora_nodes import check_output_file, lora_output_path
from .options import check_options, check_text
from .types import KilnDataset

log = logging.getLogger("kiln")

FOLDER_LOADER = {"loras": "Load LoRA", "checkpoints": "Load Checkpoint"}  # who lists the files of each folder


@dataclass
class FamilyPlan:
    """What a Train node decides for its family; ``run_training`` does the rest the same way for all. The LoRA
    fields (rules, namer, ...) are read by LoRA runs only."""
    node: str                                    # display name, for messages
    checkpoint_blocks: Callable[[nn.Module], list]
    architecture: Callable[[nn.Module], str]     # modelspec.architecture
    version: str                                 # ss_base_model_version
    objective: object
    conditioning: TextConditioning
    rules: Callable[[nn.Module], list] | None = None  # network -> TargetRules
    namer: Callable[[nn.Module], Callable[[str], str]] | None = None
    te_prefixes: dict = field(default_factory=dict)   # encoder ("clip_l", ...) -> kohya prefix ("lora_te1")
    te_lrs: dict = field(default_factory=dict)        # encoder -> learning rate; 0 or missing = not trained
    network_args: dict = field(default_factory=dict)  # network_args keys this family reads
    while_training: Callable = lambda network, seed: contextlib.nullcontext()  # e.g. SD3.5's pos-embed crops
    hidden_only: tuple = ()  # encoders whose pooled output the family ignores: clip skip leaves their last layers out
    blocks: BlockPlan | None = None              # kohya's block-wise ranks / learning rates (SD1, SDXL)
    is_sdxl: bool = False                        # which block numbering ``blocks`` uses
    metadata: dict = field(default_factory=dict)  # ss_* keys kohya's trainer for this family adds (update_metadata)
    network_module: str = "networks.lora"        # kohya's module for this family (ss_network_module)
    implementation: str = KOHYA                  # modelspec.implementation
    copy_norm_inputs: bool = False               # the network adds residuals in place (layer.Family.inplace_residuals)
    swap_blocks: Callable[[nn.Module, int], list] | None = None  # blocks_to_swap N -> the blocks it swaps (default:
    #                                              the last N of checkpoint_blocks); Flux splits N as kohya does


@dataclass
class Run:
    """What a run has settled before its trainable is built; handed to the Trainable's hooks."""
    model: object
    clip: object
    dataset: KilnDataset
    tcfg: TrainConfig
    plan: FamilyPlan
    opts: dict
    cache: LatentCache                           # the dataset's cache as ordinary (autograd-usable) tensors
    te_train: list[str]                          # text encoders that train
    notes: list[str]
    target: object = None                        # the MODEL's TrainingTarget (nodes/comfy/model.py)
    te_target: object = None                     # the CLIP's, when encoders train
    network: object = None                       # what trained (the Trainable's network)
    result: TrainResult | None = None
    samples: torch.Tensor | None = None
    seen: set = field(default_factory=set)       # distinct captions trained
    epochs: int = 1
    per_epoch: int = 1

    @property
    def node(self) -> str:
        return self.plan.node


class Trainable(Protocol):
    """What a kind of run (LoRA adapters, full weights) supplies to the skeleton."""
    kind: str                # the models/ folder of its files: intermediate saves go there, resume_from is read there
    default_save_name: str
    lora_config: object      # the LoraConfig of a LoRA run (its metadata); None for full weights
    forward_dtype: torch.dtype | None  # the dtype inputs reach the network in (None: the model's compute dtype)

    def build(self, run: Run):
        """The trainable network over ``run.target`` / ``run.te_target`` (LoRANetwork or FullNetwork)."""

    def holding(self, network) -> contextlib.AbstractContextManager:
        """While it trains: adapters attached, or full weights swapped in and given back afterwards."""

    def signature(self, network) -> dict:
        """What, beyond seed, data and batch, a saved state must share with this run to resume it exactly."""

    def resume(self, run: Run, network, path: str, signature: dict) -> dict | None:
        """Load ``path``'s weights into ``network``; its state when it resumes this run exactly."""

    def save_bytes(self, network) -> int:
        """Disk space one intermediate save (file + state) needs."""

    def file_bytes(self, network) -> int:
        """Disk space the final file needs (checked for the Save nodes this node feeds)."""

    def write(self, run: Run, network, path: str, meta: dict, state: dict, signature: dict) -> str:
        """Write an intermediate save and its state; the path written."""

    def finish(self, run: Run, network) -> None:
        """Keep what the outputs need while the trained weights are still in place."""


def normal_cache(cache: LatentCache) -> LatentCache:
    """Cache tensors made inside inference mode, re-made as ordinary tensors autograd may save."""
    return cache.map_tensors(normal_tensor)


def train_config(model, dataset: KilnDataset, opts: dict, args: dict) -> TrainConfig:
    """The node's widgets (as the registry maps them) and its training_args as one TrainConfig."""
    widgets = {name: opts.get(name, registry.WIDGETS[name].default) for name in registry.config_widgets()}
    precision = opts.get("precision", registry.WIDGETS["precision"].default)
    precision = cmodel.default_precision(model) if precision == "auto" else precision
    return TrainConfig(**args, **widgets, precision=precision, batch_size=dataset.dataset.batch_size)


def save_name_of(opts: dict, default: str) -> str:
    return (opts.get("save_name") or default).strip()


def resume_path(name: str, kind: str = "loras") -> str | None:
    name = name.strip()
    return folder_paths.get_full_path(kind, name) or folder_paths.get_full_path(kind, name + ".safetensors")


def resume_file(name: str, node: str, trainable: Trainable) -> str | None:
    """The file ``resume_from`` names in the trainable's models/ folder, None when empty; an error naming what to
    write when it is not there."""
    check_text(name, node, "resume_from")
    if not name.strip():
        return None
    kind = trainable.kind
    path = resume_path(name, kind)
    if path is None:
        raise KilnError(f"{node}: resume_from {name.strip()!r} is not a file in models/{kind}. Give the name as "
                        f"{FOLDER_LOADER[kind]} lists it, e.g. {trainable.default_save_name}-step00000500.safetensors, "
                        f"or leave it empty.")
    return path


def check_paths(opts: dict, node: str, trainable: Trainable) -> None:
    """save_name and resume_from, before any work: a bad name fails at once, not at the first save."""
    check_text(opts.get("save_name") or "", node, "save_name")
    if opts.get("save_every_n_steps", 0):
        name = save_name_of(opts, trainable.default_save_name)
        problem = check_output_file(f"{name}-step00000001", node, "save_name", kind=trainable.kind)
        if problem:
            raise KilnError(problem)
    resume_file(opts.get("resume_from") or "", node, trainable)


def validate_saving(node: str, trainable: Trainable, save_name=None):
    """A Train node's validate_inputs, when the prompt is queued: save_name must be a name inside the models folder.
    Only that input: ComfyUI reports a failure once per input validate_inputs takes. Whether the folder can be
    written (when saves are on) and resume_from are checked as the run starts (check_paths)."""
    if save_name is None:
        return True
    try:
        check_text(save_name, node, "save_name")
        name = save_name_of({"save_name": save_name}, trainable.default_save_name)
        lora_output_path(f"{name}-step00000001", node, "save_name", trainable.kind)
    except KilnError as e:
        return str(e)
    return True


# the save nodes a Train node may feed: class_type -> (the input linked to it, models folder, name)
SAVE_NODES = {"KilnSaveLora": ("lora", "loras", "Save LoRA"), "KilnSaveCheckpoint": ("model", "checkpoints",
                                                                                    "Save Checkpoint")}


def check_save_nodes(prompt: dict | None, node_id, node: str) -> list[str]:
    """The Save LoRA / Save Checkpoint nodes fed by this Train node, where their filename is a constant: a name
    that cannot be saved (or an existing file with overwrite off) stops the run now, not after training (ComfyUI
    would still train for the other outputs). Returns the Save LoRA target paths (their free space is checked once
    the LoRA's size is known)."""
    targets = []
    for nid, n in (prompt or {}).items():
        inputs = n.get("inputs", {}) if isinstance(n, dict) else {}
        socket, kind, title = SAVE_NODES.get(n.get("class_type"), (None, None, None))
        link = inputs.get(socket)
        if socket is None or not (isinstance(link, list) and str(link[0]) == str(node_id)):
            continue
        name = inputs.get("filename")
        problem = check_output_file(name, title, "filename", inputs.get("overwrite") is not False, kind) \
            if isinstance(name, str) else None
        if problem is None and kind == "loras" and isinstance(inputs.get("precision"), str) \
                and inputs["precision"] not in DTYPES:  # (ComfyUI 0.3.x does not check a V3 combo's value)
            problem = f"precision {inputs['precision']!r} is not one of its choices: {', '.join(DTYPES)}"
        if problem:
            raise KilnError(f"{node}: the {title} node ({nid}) this node feeds cannot save, so training would be "
                            f"lost: {problem}")
        if isinstance(name, str) and kind == "loras":
            targets.append(lora_output_path(name, title, "filename"))
    return targets


def intermediate_series(save_name: str, node: str, kind: str = "loras") -> tuple[str, list[str]]:
    """(folder, files of the ``<save_name>-stepNNNNNNNN`` series already there: LoRAs or checkpoints, and states)."""
    folder = os.path.dirname(lora_output_path(f"{save_name}-step00000001", node, "save_name", kind))
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
                 f"intermediate saves are {new}-stepNNNNNNNN")
    log.warning("kiln: %s: %s", node, notes[-1])
    return new


def remove_save(path: str) -> None:
    """An older intermediate save and its training state (save_last_n_epochs / save_last_n_steps)."""
    for p in (path, state_path(path)):
        if os.path.exists(p):
            os.remove(p)
            log.info("kiln: removed old checkpoint %s", p)


def prepare(model, dataset: KilnDataset, opts: dict, families: tuple[str, ...], node: str, cls, family: str,
            trainable: Trainable) -> tuple[str, TrainConfig]:
    """What every Train node checks first (option values, paths, training_args, the model's family, cached
    latents) and its TrainConfig (steps from max_train_epochs when given)."""
    check_options(cls, node, opts)
    opts["_save_targets"] = check_save_nodes(cls.hidden.prompt, cls.hidden.unique_id, node)
    check_paths(opts, node, trainable)
    fam = cmodel.require_family(model, families, node)
    if dataset.cache is None:
        raise KilnError(f"{node}: the dataset has no cached latents. Connect Load Dataset → "
                        "(Alpha/Mask Source →) Cache Latents → this node's dataset input.")
    args = parse_training_args(opts.get("training_args") or "", family, node)
    if opts["loss_type"] not in ("huber", "smooth_l1") and {"huber_c", "huber_scale", "huber_schedule"} & set(args):
        raise KilnError(f"{node}: training_args huber_* apply to loss_type huber or smooth_l1 only (loss_type is "
                        f"{opts['loss_type']}).")
    tcfg = train_config(model, dataset, opts, args)
    if tcfg.memory.cpu_offload_checkpointing and not tcfg.memory.gradient_checkpointing:
        raise KilnError(f"{node}: training_args cpu_offload_checkpointing needs gradient_checkpointing on (it keeps "
                        f"the checkpointed blocks' inputs in host memory): turn gradient_checkpointing on, or remove it.")
    for key in ("fp8_base", "fp8_base_unet"):
        if tcfg.get(key):
            cmodel.check_fp8_base(model, node, key)
    if cmodel.weight_dtype(model) in cmodel.FP8_DTYPES and not tcfg.memory.fp8_base:
        tcfg.memory.fp8_base_unet = True  # the metadata says what kohya's would: the diffusion model trained in fp8
    fam_data = layer.FAMILIES.get(family)
    for key, value in (fam_data.defaults if fam_data else {}).items():
        if key not in args:  # e.g. huber_schedule: kohya's default (snr) needs a DDPM schedule, so flow models differ
            setattr(tcfg.holder(key), key, value)
    resolve_epochs(tcfg, validation.parts(dataset.cache, tcfg)[0])
    if tcfg.preservation.diff_output_preservation:
        try:
            keep = tcfg.preservation
            tcfg.preservation_pairs = pairs_from(dataset.dataset.subsets, keep.diff_output_preservation_trigger,
                                                 keep.diff_output_preservation_class)
        except KilnError as e:
            raise KilnError(f"{node}: {e}") from None
    tcfg.training_args = args
    tcfg.session_id = random.randint(0, 2 ** 32)  # kohya's ss_session_id: one random number per run
    tcfg.training_started_at = time.time()
    tcfg.save_every = opts.get("save_every_n_steps") or 0
    return fam, tcfg


def caption_conditioning(cond: TextConditioning, dataset: KilnDataset, te_train: list[str], opts: dict,
                         node: str, report=None) -> tuple[Callable[..., dict], set[str]]:
    """The loop's ``conditioning`` callable over ``cond`` and the set of distinct captions it trained on.
    Trained text encoders (``te_train``) encode every caption again at every step; otherwise fixed captions are
    encoded once, before the loop (or read from the disk cache), and augmented ones on demand
    (``report(done, total)`` after each)."""
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
        fixed = [s for s in dataset.cache.samples if not s.captions.varies]
        for n, s in enumerate(fixed, 1):
            cond.encode(base_caption(s.caption, s.captions), pin=True)
            if report is not None:
                report(n, len(fixed))
    seen: set[str] = set()

    def conditioning(captions: list[str], train: bool = False, geometries=None) -> dict[str, torch.Tensor]:
        if train:
            seen.update(captions)
        return cond(captions, train=train, geometries=geometries)
    return conditioning, seen


def run_clock(progress: Progress, tcfg: TrainConfig, opts: dict, per_epoch: int, previews: list) -> RunClock:
    """The Train node's phases and ETA: its previews and intermediate saves planned by the loop's own rules."""
    return RunClock(progress.send, tcfg.steps, planned_previews(tcfg, opts["sample_every"], per_epoch),
                    planned_saves(tcfg, per_epoch), sum(p.steps for p in previews))


def step_reporter(progress: Progress, tcfg: TrainConfig, opts: dict, epochs: int, preview: Callable[..., object],
                  clock: RunClock, prompts: int,
                  tracker: TensorBoardLog | None = None) -> Callable[[StepInfo], None]:
    """The loop's ``on_step``: progress (with a preview image every ``sample_every`` steps, or every
    ``sample_every_n_epochs`` epochs as kohya; ``preview(on_image)`` draws its ``prompts`` images), the loss
    chart's event (the training seconds and the ETA of ``clock``), and TensorBoard when logging_dir is set."""
    every = opts["sample_every"]

    def on_step(info: StepInfo) -> None:
        image = None
        train_seconds = clock.on_step(info.step, info.seconds)
        if preview_due(tcfg, every, info.step, info.epoch, info.epoch_end):
            # with EMA on, the preview shows the average, as the saves hold it
            with info.averaged(), clock.timed("sampling", prompts) as done:
                image = preview(done)
        progress.update(info.step, image)
        if tracker is not None:
            tracker.step(info)
            if image is not None:
                tracker.image(f"step {info.step}", image, info.step)
        progress.send("kiln.loss", {"step": info.step, "total": info.total, "loss": info.loss, "lr": info.lr,
                                    "seconds": info.seconds, "epoch": info.epoch, "epochs": epochs,
                                    "val_loss": info.val_loss, "saved": info.saving,
                                    "train_seconds": train_seconds, "eta": clock.eta()})
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
    sampler = tcfg.samples.sample_sampler
    default_sampler = comfy_sampler(sampler, node) if sampler else ("euler", "normal")
    if not prompts:
        prompts = [SamplePrompt(base_caption(first.caption, first.captions))]
    specs = []
    for i, p in enumerate(prompts):
        sampler, scheduler = comfy_sampler(p.sampler, node) if p.sampler else default_sampler
        if not known_sampler(sampler, scheduler):
            raise KilnError(f"{node}: this ComfyUI has no sampler {sampler!r} / scheduler {scheduler!r} (kohya's "
                            f"{p.sampler or tcfg.samples.sample_sampler}); choose another sample_sampler.")
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
    if tcfg.text.max_token_length:
        notes.append(f"max_token_length {tcfg.text.max_token_length}: the longest caption has {longest} tokens")
    return notes


class IntermediateSaves:
    """The run's intermediate saves (save_every_n_steps, save_every_n_epochs): kohya's names (NAME-stepNNNNNNNN,
    NAME-000004), a name no other run's series holds, room on the disk before the first step, the older saves removed
    (save_last_n_steps / save_last_n_epochs)."""

    def __init__(self, run: Run, trainable: Trainable, signature: dict, resuming: str | None):
        self.run, self.trainable, self.signature = run, trainable, signature
        tcfg, node = run.tcfg, run.node
        self.name = save_name_of(run.opts, trainable.default_save_name)
        if tcfg.save_every or tcfg.saving.save_every_n_epochs:
            self.name = unique_save_name(self.name, resuming, node, run.notes, trainable.kind)
            check_writable(os.path.dirname(self.path(1, None)), trainable.save_bytes(run.network), f"{node}: save_name",
                           "Choose another save_name, free disk space, or set save_every_n_steps to 0.")

    def path(self, step: int, epoch: int | None) -> str:
        name = f"{self.name}-{epoch:06d}" if epoch else f"{self.name}-step{step:08d}"  # kohya's file names
        return lora_output_path(name, self.run.node, "save_name", self.trainable.kind)

    def save(self, step: int, state: dict, so_far: TrainResult, epoch: int | None = None) -> None:
        """The loop's ``on_save``: the trainable's file and state at this step, with the metadata so far."""
        run, tcfg = self.run, self.run.tcfg
        meta = run_metadata(run, self.trainable.lora_config, so_far, state["batches"]["epoch"])
        path = self.trainable.write(run, run.network, self.path(step, epoch), meta, state, self.signature)
        log.info("kiln: %s step %d: saved %s (+ %s)", run.node, step, path, SUFFIX)
        saving = tcfg.saving
        old = (epoch_save_to_remove(epoch, saving.save_every_n_epochs, saving.save_last_n_epochs) if epoch else
               step_save_to_remove(step, tcfg.save_every, saving.save_last_n_steps))
        if old:
            remove_save(self.path(old, old if epoch else None))


def run_training(model, clip, dataset: KilnDataset, tcfg: TrainConfig, plan: FamilyPlan, opts: dict, node_id,
                 trainable: Trainable) -> Run:
    """Train on the shared MODEL (and CLIP, when text encoders train) in place and report progress; the
    finished Run, from which the node builds its outputs (``trainable.finish`` has kept what they need)."""
    loaded = text_encoder_names(clip)
    te_train = [e for e in loaded if plan.te_lrs.get(e, 0) > 0]
    notes = [f"{e} is not in this CLIP: its text-encoder learning rate is ignored"
             for e, lr in plan.te_lrs.items() if lr > 0 and e not in loaded and e in plan.te_prefixes]
    tcfg.group_lrs = {e: plan.te_lrs[e] for e in te_train}
    run = Run(model, clip, dataset, tcfg, plan, opts, normal_cache(dataset.cache), te_train, notes)
    previews = preview_specs(opts, tcfg, dataset, plan.node, notes)
    cond = plan.conditioning
    progress = Progress(tcfg.steps, node_id)
    run.per_epoch = steps_per_epoch(validation.parts(run.cache, tcfg)[0], tcfg.batch_size, tcfg.grad_accum)
    run.epochs = math.ceil(tcfg.steps / run.per_epoch)
    clock = run_clock(progress, tcfg, opts, run.per_epoch, previews)
    clock.show("caching")  # the text encoders' outputs of the fixed captions
    cond.weighted = tcfg.text.weighted_captions  # kohya's weighted_captions; else captions are plain text
    conditioning, run.seen = caption_conditioning(cond, dataset, te_train, opts, plan.node,
                                                  lambda n, total: clock.show("caching", n, total))
    notes += caption_length_notes(cond, dataset, tcfg, plan.node)
    clock.show("preparing")  # the model on its device, the network, resume
    device = cmodel.device_of(model)

    te_session = text_encoder_session(clip, plan.node) if te_train else contextlib.nullcontext()
    with cmodel.training_session(model, plan.node, copy_norm_inputs=plan.copy_norm_inputs) as run.target, \
            te_session as run.te_target, \
            plan.while_training(run.target.network, tcfg.seed):
        net_host = run.target.network
        notes += [t.note for t in (run.target, run.te_target) if t is not None and t.note]
        if run.te_target is not None:
            cond.clip = run.te_target.patcher  # encode through the CLIP that trains (itself, or its dynamic-VRAM copy)
        main = distributed.is_main()  # under torchrun only rank 0 samples and writes; the others only train
        network = run.network = trainable.build(run)

        def preview(on_image=None) -> torch.Tensor:
            if not main:
                return torch.zeros((1, 8, 8, 3))
            network.eval()
            images = sample_images(run.target.patcher, cond, dataset.vae, previews, on_image)
            network.train()
            return images

        with trainable.holding(network):
            signature = {"seed": tcfg.seed, "samples": len(run.cache.samples), "batch_size": tcfg.batch_size,
                         "grad_accum": tcfg.grad_accum, **trainable.signature(network)}
            resuming = resume_file(opts.get("resume_from") or "", plan.node, trainable)
            resume = trainable.resume(run, network, resuming, signature) if resuming else None
            for save_path in opts.get("_save_targets", []):
                check_writable(os.path.dirname(save_path), trainable.file_bytes(network),
                               f"{plan.node}: the Save LoRA node's filename",
                               "Free disk space or choose another filename, so the trained LoRA can be saved.")
            saver = IntermediateSaves(run, trainable, signature, resuming)
            swap_blocks = plan.checkpoint_blocks(net_host)
            swapping, n_swap = swap_blocks, tcfg.memory.blocks_to_swap
            if plan.swap_blocks and n_swap:
                swapping = plan.swap_blocks(net_host, n_swap)
                n_swap = len(swapping)
            with block_swap(swapping, n_swap, device) as swap, \
                    tensorboard_log(tcfg, plan.node) as tracker:
                on_step = step_reporter(progress, tcfg, opts, run.epochs, lambda done: to_pil(preview(done)[0]),
                                        clock, len(previews), tracker)
                if tcfg.samples.sample_at_first:  # kohya's sample_at_first: a preview before the first step
                    with clock.timed("sampling", len(previews)) as done:
                        progress.update(0, to_pil(preview(done)[0]))

                def save(*args, **kw) -> None:
                    with clock.timed("saving"):
                        saver.save(*args, **kw)
                run.result = train(network, plan.objective,
                                   cmodel.unet_forward(run.target.patcher, net_host, trainable.forward_dtype), conditioning,
                                   run.cache, cmodel.latent_in(model), tcfg, device, swap_blocks, on_step,
                                   save if main else None, resume)
                with clock.timed("sampling", len(previews)) as done:
                    run.samples = preview(done)
                if tracker is not None:
                    tracker.image("final", to_pil(run.samples[0]), run.result.steps)
                if swap is not None:
                    notes.append(f"blocks_to_swap {tcfg.memory.blocks_to_swap}: {len(swap.swapped)} of "
                                 f"{len(swap_blocks)} blocks kept in host memory ({swap.freed_bytes / 2 ** 20:.0f} MiB off the device), "
                                 f"{swap.transfers} block transfers")
            trainable.finish(run, network)
    cond.live, cond.clip = False, clip
    return run


def run_metadata(run: Run, lora_config=None, result: TrainResult | None = None, epoch: int | None = None) -> dict:
    """The kohya metadata of the run's file: the final one, or (``result``, ``epoch``) an intermediate save's."""
    plan = run.plan
    return training_metadata(plan.version, plan.architecture(run.target.network), run.dataset.dataset,
                             run.dataset.cache, lora_config, run.tcfg, result or run.result, "",
                             run.epochs if epoch is None else epoch, plan.metadata, plan.network_module,
                             plan.implementation)


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


LOSS_PLOT_SIZE = (400, 240)


def loss_image(result: TrainResult) -> torch.Tensor:
    """The loss_plot IMAGE of every Train node: loss, smoothed loss, learning rate, validation points, saves; at
    about the size a Preview Image node shows it, so its 11-13 px labels stay readable there."""
    return pil_to_image(loss_plot(result.losses, LOSS_PLOT_SIZE[0], LOSS_PLOT_SIZE[1], validation=result.validation,
                                  lrs=result.lrs, saves=result.saves))
