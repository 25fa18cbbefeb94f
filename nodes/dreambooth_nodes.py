"""Train DreamBooth (SD1/SD2) and Save Checkpoint: kohya's train_db.py as a node. The whole UNet (and, with a
text-encoder learning rate, the text encoder) trains, through the same loop, dataset, schedule, optimizer,
precision, loss and sample plumbing as the Train LoRA nodes (train_nodes.py); trainer_core/full.py holds the
weights while they train and gives the input MODEL/CLIP back as they were."""
from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
from comfy_api.latest import io, ui

from ..trainer_core import distributed, validation
from ..trainer_core.atomic import check_writable
from ..trainer_core.checkpoint_io import checkpoint_bytes, save_checkpoint_file
from ..trainer_core.epochs import epoch_save_to_remove, step_save_to_remove, steps_per_epoch
from ..trainer_core.errors import KilnError
from ..trainer_core.families import sd1
from ..trainer_core.full import FullNetwork
from ..trainer_core.loop import train
from ..trainer_core.resume import SUFFIX, load_state, save_state, state_path
from ..trainer_core.tracking import tensorboard_log
from .comfy import model as cmodel
from .comfy.preview import sample_images, to_pil
from .comfy.progress import Progress
from .comfy.text import TextConditioning, text_encoder_names, text_encoder_session
from .lora_nodes import check_output_file, lora_output_path
from .options import check_text
from .train_nodes import (caption_conditioning, common_inputs, ddpm_objective, loss_image, normal_cache, prepare,
                          remove_save, preview_specs, resume_path, run_summary, step_reporter, training_args_input,
                          training_metadata, unique_save_name)
from .types import KilnDataset, KilnDatasetType

log = logging.getLogger("kiln")

NODE = "Train DreamBooth (SD1/SD2)"
SAVE_NODE = "Save Checkpoint (Kiln)"
DEFAULT_SAVE_NAME = "kiln/dreambooth"
LORA_ONLY = ("save_every_n_steps", "save_name", "resume_from")  # the LoRA nodes' save/resume inputs (models/loras)
SD1_ENCODERS = ("clip_l", "clip_h")  # SD1's CLIP-L, SD2's OpenCLIP-H


def dreambooth_inputs() -> list:
    shared = [i for i in common_inputs(learning_rate=1e-6) if i.id not in LORA_ONLY]
    return shared + [
        io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=10.0, step=1e-7, optional=True,
                       tooltip="Learning rate of the text encoder (kohya learning_rate_te); 0 = the text encoder "
                               "does not train (kohya stop_text_encoder_training=-1)."),
        io.Int.Input("stop_text_encoder_training", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="The text encoder trains in the first N steps only, then only the UNet (kohya's "
                             "meaning); 0 = it trains to the end."),
        io.Boolean.Input("fused_backward_pass", default=False, optional=True,
                         tooltip="Step each weight as soon as its gradient is ready and free that gradient: the "
                                 "gradients of the whole model are never held together. Needs max_grad_norm 0, "
                                 "grad_accum 1, no fp16."),
        io.Int.Input("save_every_n_steps", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="Also write the full checkpoint every N steps, as <save_name>-stepNNNNNN.safetensors "
                             "in models/checkpoints. 0 = off."),
        io.String.Input("save_name", default=DEFAULT_SAVE_NAME, optional=True,
                        tooltip="Name (inside models/checkpoints) of the intermediate checkpoints."),
        io.String.Input("resume_from", default="", optional=True,
                        tooltip="An intermediate checkpoint of an earlier run, as Load Checkpoint lists it (e.g. "
                                "kiln/dreambooth-step000500.safetensors): training continues from its weights, "
                                "and with the .kiln-state beside it and the same seed, data and settings, "
                                "bit-identically to the run that never stopped. Empty = start from the input model."),
    ]


def save_name_of(opts: dict) -> str:
    return (opts.get("save_name") or DEFAULT_SAVE_NAME).strip()


def checkpoint_path(name: str, what: str = "save_name", node: str = NODE) -> str:
    return lora_output_path(name, node, what, "checkpoints")


def resume_file(name: str) -> str | None:
    check_text(name, NODE, "resume_from")
    if not name.strip():
        return None
    path = resume_path(name, "checkpoints")
    if path is None:
        raise KilnError(f"{NODE}: resume_from {name.strip()!r} is not a file in models/checkpoints. Give the name as "
                        f"Load Checkpoint lists it, e.g. kiln/dreambooth-step000500.safetensors, or leave it empty.")
    return path


def resume_weights(net: FullNetwork, model, path: str, signature: dict, notes: list) -> dict | None:
    """Continue from an intermediate checkpoint: its weights go into the trainable tensors (refused when they do
    not fit), and its training state is returned when it belongs to a run like this one."""
    name = os.path.basename(path)
    missing, mismatched = net.load_weights(cmodel.checkpoint_weights(model, path))
    absent = set(missing)
    empty = [g for g, slots in net.slots.items() if all(s.key in absent for s in slots)]
    if mismatched or empty:
        what = (f"{len(mismatched)} weights have another shape, e.g. {mismatched[0]}" if mismatched
                else f"it holds no {'/'.join(empty)} weights")
        raise KilnError(f"{NODE}: resume_from {name} does not fit this model: {what}. Resume with the model family "
                        f"it was trained from.")
    if missing:  # what ComfyUI leaves out of checkpoints (e.g. CLIP-L's unused logit_scale) Load Checkpoint skips too
        notes.append(f"resume_from {name}: {len(missing)} weights not in the file keep the input model's values, "
                     f"as Load Checkpoint leaves them (e.g. {missing[0]})")
    state, note = load_state(path, signature)
    if state is not None and "weights" in state:  # the float32 values behind a narrower checkpoint
        net.load_weights(state.pop("weights"))
    notes.append(f"resume_from {name}: {note}")
    return state


class KilnTrainDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnTrainDreamBooth", display_name=NODE, category="Kiln",
            description="DreamBooth in kohya's sense (train_db.py): fine-tunes the whole UNet (and the text encoder "
                        "with a learning rate) of the loaded SD 1.x/2.x model, with regularization images and "
                        "prior_loss_weight. The input MODEL/CLIP are left exactly as they were.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"), KilnDatasetType.Input("dataset")]
            + dreambooth_inputs() + [training_args_input("sd1")],
            outputs=[io.Model.Output(display_name="model", tooltip="The fine-tuned model."),
                     io.Clip.Output(display_name="clip", tooltip="The fine-tuned CLIP (the input CLIP when the "
                                                                "text encoder did not train)."),
                     io.Image.Output(display_name="samples"), io.Image.Output(display_name="loss_plot")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt], not_idempotent=False)

    @classmethod
    def validate_inputs(cls, save_every_n_steps=None, save_name=None, resume_from=None):
        try:
            resume_file(resume_from or "")
        except KilnError as e:
            return str(e)
        if save_every_n_steps and save_name is not None:
            return check_output_file(f"{save_name_of({'save_name': save_name})}-step000001", NODE, "save_name",
                                     kind="checkpoints") or True
        return True

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, **opts) -> io.NodeOutput:
        saving = {k: opts.pop(k) for k in LORA_ONLY if k in opts}
        check_text(saving.get("save_name") or "", NODE, "save_name")
        resuming = resume_file(saving.get("resume_from") or "")
        fam, tcfg = prepare(model, dataset, opts, cmodel.SD1_FAMILIES, NODE, cls, "sd1")
        if tcfg.blocks_to_swap:
            raise KilnError(f"{NODE}: training_args blocks_to_swap moves frozen weights between host and device; full "
                            f"fine-tuning trains every weight, so they stay on the device. Remove it (gradient "
                            f"checkpointing and cpu_offload_checkpointing save memory here).")
        is_v = cmodel.prediction_type(model, NODE) == "v"
        is_sd2 = fam not in ("SD15", "SD15_instructpix2pix")
        tcfg.fused_backward_pass = tcfg.fused_backward_pass or bool(opts.get("fused_backward_pass"))
        tcfg.stop_text_encoder_training = opts.get("stop_text_encoder_training") or None
        te_lr = opts.get("text_encoder_lr") or 0.0
        encoders = [e for e in text_encoder_names(clip) if e in SD1_ENCODERS] if te_lr > 0 else []
        tcfg.group_lrs = {e: te_lr for e in encoders}
        tcfg.save_every = saving.get("save_every_n_steps") or 0
        save_name = save_name_of(saving)
        notes: list[str] = []
        if tcfg.save_every or tcfg.save_every_n_epochs:
            checkpoint_path(f"{save_name}-step000001")
            save_name = unique_save_name(save_name, resuming, NODE, notes, "checkpoints")

        cond = TextConditioning(clip)
        previews = preview_specs(opts, tcfg, dataset, NODE, notes)
        conditioning, seen = caption_conditioning(cond, dataset, encoders, opts, NODE)
        cache = normal_cache(dataset.cache)
        progress = Progress(tcfg.steps, cls.hidden.unique_id)
        epochs = math.ceil(tcfg.steps / steps_per_epoch(validation.parts(cache, tcfg)[0], tcfg.batch_size,
                                                        tcfg.grad_accum))
        version = ("sd_v2" if is_sd2 else "sd_v1") + ("_v" if is_v else "")
        arch = sd1.modelspec_architecture(is_v, is_sd2, lora=False)
        net = FullNetwork()
        te_session = text_encoder_session(clip, NODE) if encoders else contextlib.nullcontext()
        with cmodel.training_session(model, NODE) as target, te_session as te_target:
            notes += [t.note for t in (target, te_target) if t is not None and t.note]
            if te_target is not None:
                cond.clip = te_target.patcher  # encode through the CLIP that trains
            try:
                net.add(target.network, "unet", "diffusion_model.")
                for e in encoders:
                    net.add(getattr(te_target.network, e), e, f"{e}.")
                weights_dtype = model.model.get_dtype()
                signature = {"seed": tcfg.seed, "samples": len(cache.samples), "batch_size": tcfg.batch_size,
                             "grad_accum": tcfg.grad_accum, "tensors": len(net), "trained": ",".join(net.slots)}
                resume = resume_weights(net, model, resuming, signature, notes) if resuming else None
                last_state: list[str] = []

                main = distributed.is_main()  # under torchrun only rank 0 samples and writes; the others train

                def preview() -> torch.Tensor:
                    if not main:
                        return torch.zeros((1, 8, 8, 3))
                    return sample_images(target.patcher, cond, dataset.vae, previews)

                def intermediate_path(step: int, epoch: int | None) -> str:  # kohya's names, as the LoRA nodes'
                    return checkpoint_path(f"{save_name}-{epoch:06d}" if epoch else f"{save_name}-step{step:06d}")

                def on_save(step: int, state: dict, so_far, epoch: int | None = None) -> None:
                    sd, meta = cmodel.checkpoint_state_dict(target.patcher, te_target.patcher if te_target else clip,
                                                            dataset.vae, in_place=True, dtype=weights_dtype)
                    meta.update(training_metadata(version, arch, dataset, None, tcfg, so_far, "",
                                                  state["batches"]["epoch"]))
                    path = save_checkpoint_file(intermediate_path(step, epoch), sd, meta)
                    if weights_dtype != torch.float32 and state.get("trained") is None:  # EMA: trained ones kept
                        state = dict(state, weights=net.state_weights())
                    save_state(path, state, signature)
                    for older in last_state:  # a full model's state is ~3x its float32 size: keep the newest only
                        if os.path.exists(older):
                            os.remove(older)
                    last_state[:] = [state_path(path)]
                    log.info("kiln: %s step %d: saved %s (+ %s)", NODE, step, path, SUFFIX)
                    old = (epoch_save_to_remove(epoch, tcfg.save_every_n_epochs, tcfg.save_last_n_epochs) if epoch
                           else step_save_to_remove(step, tcfg.save_every, tcfg.save_last_n_steps))
                    if old:
                        remove_save(intermediate_path(old, old if epoch else None))

                if tcfg.save_every or tcfg.save_every_n_epochs:
                    size = net.numel() * torch.finfo(weights_dtype).bits // 8
                    state_size = net.numel() * 4 * 3  # AdamW's two moments and the float32 weights, at most
                    check_writable(os.path.dirname(intermediate_path(1, None)), 2 * size + state_size,
                                   f"{NODE}: save_name",
                                   "Choose another save_name, free disk space, or set save_every_n_steps to 0.")
                with tensorboard_log(tcfg, NODE) as tracker:
                    on_step = step_reporter(progress, tcfg, opts, epochs, lambda: to_pil(preview()[0]), tracker)
                    result = train(net, ddpm_objective(model, is_v, tcfg),
                                   cmodel.unet_forward(target.patcher, target.network, torch.float32), conditioning,
                                   cache, cmodel.latent_in(model), tcfg, cmodel.device_of(model),
                                   sd1.checkpoint_blocks(target.network), on_step, on_save if main and (
                                       tcfg.save_every or tcfg.save_every_n_epochs) else None, resume)
                    samples = preview()
                    if tracker is not None:
                        tracker.image("final", to_pil(samples[0]), result.steps)
                unet_sd = net.trained("unet")
                clip_sd = {k: v for e in encoders for k, v in net.trained(e).items()}
            finally:
                net.restore()  # Cancel, a NaN loss or success: the input MODEL/CLIP get their own weights back
        cond.live, cond.clip = False, clip

        meta = training_metadata(version, arch, dataset, None, tcfg, result, "", epochs)
        meta["ss_stop_text_encoder_training"] = str(tcfg.stop_text_encoder_training or (tcfg.steps if encoders else 0))
        meta["ss_fused_backward_pass"] = str(tcfg.fused_backward_pass)
        meta["kiln_trained"] = ",".join(["unet"] + encoders)
        model_out, clip_out = cmodel.apply_weights(model, clip, unet_sd, clip_sd, meta)
        trained = f"DreamBooth: UNet ({sum(t.numel() for t in unet_sd.values()) / 1e6:.1f}M weights)"
        if encoders:
            stop = f", stopped after step {tcfg.stop_text_encoder_training}" if tcfg.stop_text_encoder_training else ""
            trained += f" + {'/'.join(encoders)} ({sum(t.numel() for t in clip_sd.values()) / 1e6:.1f}M{stop})"
        text = run_summary(trained, f"{len(seen)} distinct captions; {epochs} epoch{'s' if epochs != 1 else ''}",
                           result, tcfg, notes)
        return io.NodeOutput(model_out, clip_out, samples, loss_image(result), ui=ui.PreviewText(text))


class KilnSaveCheckpoint(io.ComfyNode):
    """ComfyUI's Save Checkpoint writes the same tensors (same assembly: nodes/comfy/model.checkpoint_state_dict)
    but no training metadata, into output/; this one writes Kiln's ss_* keys too, atomically, into
    models/checkpoints, where Load Checkpoint lists it at once."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnSaveCheckpoint", display_name=SAVE_NODE, category="Kiln",
            description="Writes MODEL + CLIP + VAE as one .safetensors checkpoint (the layout Load Checkpoint, A1111 "
                        "and Forge read) into models/checkpoints, atomically, with the training metadata of a "
                        "Train DreamBooth run.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"),
                    io.String.Input("filename", default=DEFAULT_SAVE_NAME,
                                    tooltip="Inside models/checkpoints; sub-folders allowed."),
                    io.Boolean.Input("overwrite", default=True,
                                     tooltip="Off: stop instead of replacing an existing file.")],
            outputs=[io.String.Output(display_name="path")], is_output_node=True)

    @classmethod
    def validate_inputs(cls, filename=None, overwrite=None):
        if filename is not None:
            return check_output_file(filename, SAVE_NODE, "filename", overwrite is not False, "checkpoints") or True
        return True

    @classmethod
    def execute(cls, model, clip, vae, filename, overwrite=True) -> io.NodeOutput:
        path = checkpoint_path(filename, "filename", SAVE_NODE)
        if os.path.exists(path) and not overwrite:
            raise KilnError(f"{SAVE_NODE}: {path} exists and overwrite is off; choose another name or turn "
                            f"overwrite on.")
        sd, meta = cmodel.checkpoint_state_dict(model, clip, vae)
        check_writable(os.path.dirname(path), checkpoint_bytes(sd), f"{SAVE_NODE}: filename",
                       "Free disk space or choose another filename.")
        meta["ss_output_name"] = os.path.splitext(os.path.basename(path))[0]
        meta.setdefault("modelspec.title", meta["ss_output_name"])
        save_checkpoint_file(path, sd, meta)
        return io.NodeOutput(path, ui=ui.PreviewText(f"saved {path}"))
