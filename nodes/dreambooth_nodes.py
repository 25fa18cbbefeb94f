"""Train DreamBooth (SD1/SD2) and Save Checkpoint: kohya's train_db.py as a node. The whole UNet (and, with a
text-encoder learning rate, the text encoder) trains through the same run skeleton as the Train LoRA nodes
(training_run.py); its Trainable here holds the weights while they train (trainer_core/training/full.py) and gives the input
MODEL/CLIP back exactly as they were."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io, ui

from ..trainer_core.options import registry
from ..trainer_core.files.atomic import check_writable
from ..trainer_core.files.checkpoint_io import checkpoint_bytes, save_checkpoint_file
from ..trainer_core.errors import KilnError
from ..trainer_core.families import sd1
from ..trainer_core.training.full import FullNetwork
from ..trainer_core.files.resume import load_state, save_state, state_path
from .comfy import model as cmodel
from .comfy.text import TextConditioning, with_clip_skip
from .lora_nodes import check_output_file, lora_output_path
from .train_inputs import node_widgets
from .train_nodes import family_objective, sd1_kind
from .training_run import FamilyPlan, Run, loss_image, prepare, run_metadata, run_summary, run_training, \
    validate_saving
from . import tooltips as tips
from .types import KilnDataset, KilnDatasetType

log = logging.getLogger("kiln")

NODE = "Train DreamBooth (SD1/SD2)"
SAVE_NODE = "Save Checkpoint (Kiln)"
DEFAULT_SAVE_NAME = registry.widget("save_name", "dreambooth").default
SD1_ENCODERS = ("clip_l", "clip_h")  # SD1's CLIP-L, SD2's OpenCLIP-H


def checkpoint_path(name: str, what: str = "save_name", node: str = NODE) -> str:
    return lora_output_path(name, node, what, "checkpoints")


@dataclass
class FullTrainable:
    """Every weight of the UNet (and of the text encoders that train), fine-tuned in place and given back."""
    kind: str = "checkpoints"
    default_save_name: str = DEFAULT_SAVE_NAME
    lora_config: object = None
    forward_dtype: torch.dtype = torch.float32  # the network computes with its float32 trainable weights
    last_state: list = field(default_factory=list)

    def build(self, run: Run) -> FullNetwork:
        net = FullNetwork()
        self.weights_dtype = run.model.model.get_dtype()
        try:
            net.add(run.target.network, "unet", "diffusion_model.")
            for e in run.te_train:
                net.add(getattr(run.te_target.network, e), e, f"{e}.")
        except BaseException:
            net.restore()
            raise
        return net

    @staticmethod
    @contextlib.contextmanager
    def holding(net: FullNetwork):
        """Cancel, a NaN loss or success: the input MODEL/CLIP get their own weights back."""
        try:
            yield net
        finally:
            net.restore()

    def signature(self, net: FullNetwork) -> dict:
        return {"tensors": len(net), "trained": ",".join(net.slots)}

    def resume(self, run: Run, net: FullNetwork, path: str, signature: dict) -> dict | None:
        """Continue from an intermediate checkpoint: its weights go into the trainable tensors (refused when they
        do not fit), and its training state is returned when it belongs to a run like this one."""
        name = os.path.basename(path)
        missing, mismatched = net.load_weights(cmodel.checkpoint_weights(run.model, path))
        absent = set(missing)
        empty = [g for g, slots in net.slots.items() if all(s.key in absent for s in slots)]
        if mismatched or empty:
            what = (f"{len(mismatched)} weights have another shape, e.g. {mismatched[0]}" if mismatched
                    else f"it holds no {'/'.join(empty)} weights")
            raise KilnError(f"{NODE}: resume_from {name} does not fit this model: {what}. Resume with the model "
                            f"family it was trained from.")
        if missing:  # what ComfyUI leaves out of checkpoints (e.g. CLIP-L's unused logit_scale) Load Checkpoint skips too
            run.notes.append(f"resume_from {name}: {len(missing)} weights not in the file keep the input model's "
                             f"values, as Load Checkpoint leaves them (e.g. {missing[0]})")
        state, note = load_state(path, signature)
        if state is not None and "weights" in state:  # the float32 values behind a narrower checkpoint
            net.load_weights(state.pop("weights"))
        run.notes.append(f"resume_from {name}: {note}")
        return state

    def file_bytes(self, net: FullNetwork) -> int:
        return net.numel() * torch.finfo(self.weights_dtype).bits // 8

    def save_bytes(self, net: FullNetwork) -> int:
        return 2 * self.file_bytes(net) + net.numel() * 4 * 3  # + AdamW's two moments and the float32 weights, at most

    def write(self, run: Run, net: FullNetwork, path: str, meta: dict, state: dict, signature: dict) -> str:
        te = run.te_target.patcher if run.te_target else run.clip
        sd, file_meta = cmodel.checkpoint_state_dict(run.target.patcher, te, run.dataset.vae, in_place=True,
                                                     dtype=self.weights_dtype)
        file_meta.update(meta)
        path = save_checkpoint_file(path, sd, file_meta)
        if self.weights_dtype != torch.float32 and state.get("trained") is None:  # EMA: trained ones kept
            state = dict(state, weights=net.state_weights())
        save_state(path, state, signature)
        for older in self.last_state:  # a full model's state is ~3x its float32 size: keep the newest only
            if os.path.exists(older):
                os.remove(older)
        self.last_state[:] = [state_path(path)]
        return path

    def finish(self, run: Run, net: FullNetwork) -> None:
        self.unet_sd = net.trained("unet")
        self.clip_sd = {k: v for e in run.te_train for k, v in net.trained(e).items()}


class KilnTrainDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KilnTrainDreamBooth", display_name=NODE, category="Kiln",
            description="DreamBooth in kohya's sense (train_db.py): fine-tunes the whole UNet (and the text encoder "
                        "with a learning rate) of the loaded SD 1.x/2.x model, with regularization images and "
                        "prior_loss_weight. The input MODEL/CLIP are left exactly as they were.",
            inputs=[io.Model.Input("model", tooltip=tips.MODEL), io.Clip.Input("clip", tooltip=tips.CLIP),
                    KilnDatasetType.Input("dataset", tooltip=tips.TRAIN_DATASET)]
            + node_widgets("dreambooth", "sd1"),
            outputs=[io.Model.Output(display_name="model", tooltip="The fine-tuned model."),
                     io.Clip.Output(display_name="clip", tooltip="The fine-tuned CLIP (the input CLIP when the "
                                                                "text encoder did not train)."),
                     io.Image.Output(display_name="samples"), io.Image.Output(display_name="loss_plot")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt], not_idempotent=False)

    @classmethod
    def validate_inputs(cls, save_name=None):
        return validate_saving(NODE, FullTrainable, save_name)

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, **opts) -> io.NodeOutput:
        trainable = FullTrainable()
        fam, tcfg = prepare(model, dataset, opts, cmodel.SD1_FAMILIES, NODE, cls, "sd1", trainable)
        if tcfg.memory.blocks_to_swap:
            raise KilnError(f"{NODE}: training_args blocks_to_swap moves frozen weights between host and device; full "
                            f"fine-tuning trains every weight, so they stay on the device. Remove it (gradient "
                            f"checkpointing and cpu_offload_checkpointing save memory here).")
        # training, previews and the clip output all use the clip_skip layer
        clip, tcfg.text.clip_skip = with_clip_skip(clip, tcfg.text.clip_skip, NODE)
        is_v, is_sd2, version = sd1_kind(model, fam, NODE)
        tcfg.optim.fused_backward_pass = tcfg.optim.fused_backward_pass or bool(opts.get("fused_backward_pass"))
        tcfg.stop_text_encoder_training = opts.get("stop_text_encoder_training") or None
        te_lr = opts.get("text_encoder_lr") or 0.0
        plan = FamilyPlan(
            node=NODE, checkpoint_blocks=sd1.checkpoint_blocks,
            architecture=lambda unet: sd1.modelspec_architecture(is_v, is_sd2, lora=False),
            version=version,
            objective=family_objective(model, "sd1", tcfg),
            conditioning=TextConditioning(clip, tcfg.text.max_token_length),
            te_lrs={e: te_lr for e in SD1_ENCODERS})
        run = run_training(model, clip, dataset, tcfg, plan, opts, cls.hidden.unique_id, trainable)

        encoders = run.te_train
        meta = run_metadata(run)
        meta["ss_stop_text_encoder_training"] = str(tcfg.stop_text_encoder_training or (tcfg.steps if encoders else 0))
        meta["ss_fused_backward_pass"] = str(tcfg.optim.fused_backward_pass)
        meta["kiln_trained"] = ",".join(["unet"] + encoders)
        model_out, clip_out = cmodel.apply_weights(model, clip, trainable.unet_sd, trainable.clip_sd, meta)
        trained = f"DreamBooth: UNet ({sum(t.numel() for t in trainable.unet_sd.values()) / 1e6:.1f}M weights)"
        if encoders:
            stop = f", stopped after step {tcfg.stop_text_encoder_training}" if tcfg.stop_text_encoder_training else ""
            trained += f" + {'/'.join(encoders)} ({sum(t.numel() for t in trainable.clip_sd.values()) / 1e6:.1f}M{stop})"
        text = run_summary(trained, f"{len(run.seen)} distinct captions; {run.epochs} "
                                    f"epoch{'s' if run.epochs != 1 else ''}", run.result, tcfg, run.notes)
        return io.NodeOutput(model_out, clip_out, run.samples, loss_image(run.result), ui=ui.PreviewText(text))


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
            inputs=[io.Model.Input("model", tooltip="The fine-tuned model from Train DreamBooth."),
                    io.Clip.Input("clip", tooltip="Train DreamBooth's CLIP (fine-tuned when the text encoder trained)."),
                    io.Vae.Input("vae", tooltip="The VAE to store in the checkpoint (Load Checkpoint's)."),
                    io.String.Input("filename", default=DEFAULT_SAVE_NAME,
                                    tooltip="Inside models/checkpoints; sub-folders allowed."),
                    io.Boolean.Input("overwrite", default=True,
                                     tooltip="Off: stop instead of replacing an existing file.")],
            outputs=[io.String.Output(display_name="path")], is_output_node=True)

    @classmethod
    def validate_inputs(cls, filename=None):
        """Only filename (ComfyUI reports a failure once per input taken): an existing file with overwrite off is
        refused by the Train node before it trains (check_save_nodes), and here when it runs."""
        if filename is not None:
            return check_output_file(filename, SAVE_NODE, "filename", kind="checkpoints") or True
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
