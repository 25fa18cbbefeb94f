"""Train LoRA (SD1 / SDXL / SD3 / Flux / any model): each node states its family's plan (objective, conditioning,
target rules, kohya names); the run skeleton (training_run.py) and the LoRA trainable (lora_training.py) do the rest."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..trainer_core.errors import KilnError
from ..trainer_core.training import distributed
from ..trainer_core.options import registry
from ..trainer_core.families import flux, layer, sd1, sd3, sdxl
from ..trainer_core.training.loop import TrainConfig
from ..trainer_core.lora.blocks import NETWORK_ARGS as BLOCK_ARGS
from ..trainer_core.lora.config import LoraConfig
from ..trainer_core.lora.network_args import bool_arg, parse_network_args
from ..trainer_core.lora.targets import block_linear_rules, repeated_block_lists, select_targets
from .comfy import model as cmodel
from .comfy.text import FluxTextConditioning, ModelConditioning, SD3TextConditioning, SDXLTextConditioning, \
    TextConditioning, with_clip_skip
from .lora_training import LORAPLUS_ARGS, VERBOSE, LoraTrainable, unet_blocks, unet_conv_rank
from .train_inputs import train_schema
from .training_run import FamilyPlan, prepare, run_training, validate_saving
from .types import KilnDataset

log = logging.getLogger("kiln")


def family_objective(model, key: str, tcfg: TrainConfig, opts: dict | None = None):
    """The family's objective on ComfyUI's own model sampling of this MODEL (the family layer)."""
    fam = layer.FAMILIES[key]
    return layer.objective(fam, cmodel.sampling(model, fam.node), tcfg, opts or {})


def sd1_kind(model, fam: str, node: str) -> tuple[bool, bool, str]:
    """(v-prediction, SD 2.x, kohya's ss_base_model_version) of an SD 1.x/2.x MODEL."""
    is_v = cmodel.prediction_type(model, node) == "v"
    is_sd2 = fam not in ("SD15", "SD15_instructpix2pix")
    return is_v, is_sd2, ("sd_v2" if is_sd2 else "sd_v1") + ("_v" if is_v else "")


class TrainNode(io.ComfyNode):
    """What the Train LoRA nodes share beyond their schema: checks run when the prompt is queued, and the run."""

    @classmethod
    def validate_inputs(cls, save_name=None):
        return validate_saving(cls.define_schema().display_name, LoraTrainable, save_name)

    @classmethod
    def train(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, tcfg: TrainConfig, plan: FamilyPlan,
              opts: dict, family: str) -> io.NodeOutput:
        trainable = LoraTrainable(lora_config, plan)
        run = run_training(model, clip, dataset, tcfg, plan, opts, cls.hidden.unique_id, trainable)
        return trainable.outputs(run, family)


class KilnTrainSD1(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainSD1", "Train LoRA (SD1)",
            "Trains a LoRA on the loaded SD 1.x/2.x model in place (no second copy), with live loss and samples.", "sd1")

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (SD1)"
        fam, tcfg = prepare(model, dataset, opts, cmodel.SD1_FAMILIES, node, cls, "sd1", LoraTrainable)
        # training, previews and the clip output all use the clip_skip layer
        clip, tcfg.text.clip_skip = with_clip_skip(clip, tcfg.text.clip_skip, node)
        is_v, is_sd2, version = sd1_kind(model, fam, node)
        lc = lora_config
        blocks = unet_blocks(lc, False)
        plan = FamilyPlan(
            node=node, blocks=blocks, is_sdxl=False, network_args={**VERBOSE, **BLOCK_ARGS},
            rules=lambda unet: sd1.unet_rules(lc.rank, lc.alpha, unet_conv_rank(lc, blocks), lc.conv_alpha),
            namer=sd1.unet_namer, checkpoint_blocks=sd1.checkpoint_blocks,
            architecture=lambda unet: sd1.modelspec_architecture(is_v, is_sd2), version=version,
            objective=family_objective(model, "sd1", tcfg),
            conditioning=TextConditioning(clip, tcfg.text.max_token_length),
            te_prefixes={"clip_l": "lora_te", "clip_h": "lora_te"}, hidden_only=("clip_l", "clip_h"),
            te_lrs={"clip_l": opts.get("text_encoder_lr", 0.0), "clip_h": opts.get("text_encoder_lr", 0.0)})
        return cls.train(model, clip, dataset, lora_config, tcfg, plan, opts, fam)


class KilnTrainSD3(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainSD3", "Train LoRA (SD3)",
            "Trains a LoRA on the loaded SD3 / SD3.5 model in place (rectified flow, kohya's SD3 options).", "sd3")

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (SD3)"
        fam, tcfg = prepare(model, dataset, opts, cmodel.SD3_FAMILIES, node, cls, "sd3", LoraTrainable)
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
            objective=family_objective(model, "sd3", tcfg, opts),
            conditioning=conditioning, network_args={**VERBOSE, **sd3.NETWORK_ARGS, **LORAPLUS_ARGS},
            te_prefixes=sd3.TE_PREFIXES,
            te_lrs={"clip_l": opts.get("text_encoder_lr1", 0.0), "clip_g": opts.get("text_encoder_lr2", 0.0),
                    "t5xxl": opts.get("text_encoder_lr3", 0.0)},
            while_training=lambda mmdit, seed: cmodel.random_pos_embed_crop(mmdit, opts["pos_emb_random_crop_rate"], seed),
            metadata=registry.widget_metadata(opts, "sd3"))  # sd3_train_network.update_metadata
        return cls.train(model, clip, dataset, lora_config, tcfg, plan, opts, fam)


class KilnTrainSDXL(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainSDXL", "Train LoRA (SDXL)",
            "Trains a LoRA on the loaded SDXL-family model (SDXL, SSD-1B, Vega, KOALA) in place, with "
            "both text encoders and the size/crop conditioning from bucketing.", "sdxl")

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (SDXL)"
        fam, tcfg = prepare(model, dataset, opts, cmodel.SDXL_FAMILIES, node, cls, "sdxl", LoraTrainable)
        is_v = cmodel.prediction_type(model, node) == "v"
        lc = lora_config
        blocks = unet_blocks(lc, True)
        plan = FamilyPlan(
            node=node, blocks=blocks, is_sdxl=True, network_args={**VERBOSE, **BLOCK_ARGS},
            rules=lambda unet: sdxl.unet_rules(lc.rank, lc.alpha, unet_conv_rank(lc, blocks), lc.conv_alpha),
            namer=sdxl.unet_namer, checkpoint_blocks=sdxl.checkpoint_blocks,
            architecture=lambda unet: sdxl.ARCHITECTURE, version=sdxl.BASE_MODEL_VERSION + ("_v" if is_v else ""),
            objective=family_objective(model, "sdxl", tcfg),
            conditioning=SDXLTextConditioning(clip, model, tcfg.text.max_token_length), te_prefixes=sdxl.TE_PREFIXES,
            hidden_only=("clip_l",),
            te_lrs={"clip_l": opts.get("text_encoder_lr1", 0.0), "clip_g": opts.get("text_encoder_lr2", 0.0)})
        return cls.train(model, clip, dataset, lora_config, tcfg, plan, opts, fam)


class KilnTrainFlux(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainFlux", "Train LoRA (Flux)",
            "Trains a LoRA on the loaded FLUX.1 (dev, schnell) or Chroma model in place, with kohya's "
            "flux_train_network options.", "flux")

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (Flux)"
        fam, tcfg = prepare(model, dataset, opts, cmodel.FLUX_FAMILIES, node, cls, "flux", LoraTrainable)
        check_flux_options(fam, opts, tcfg, node)
        lc = lora_config
        args = parse_network_args(lc.args)
        double, single = flux.check_shape(model.model.diffusion_model)
        rules = flux.rules(args, lc.rank, lc.alpha, double, single, node)
        t5_tokens = opts["t5xxl_max_token_length"] or (256 if fam == "FluxSchnell" else 512)
        train_t5 = bool_arg(args, "train_t5xxl")
        plan = FamilyPlan(
            node=node, rules=lambda net: rules, namer=lambda net: flux.unet_namer,
            checkpoint_blocks=flux.checkpoint_blocks, swap_blocks=flux.swap_blocks,
            architecture=lambda net: flux.modelspec_architecture(fam), version=flux.base_model_version(fam),
            implementation=flux.modelspec_implementation(fam),
            network_module=layer.FAMILIES["flux"].network_module,
            copy_norm_inputs=layer.FAMILIES["flux"].inplace_residuals,
            objective=family_objective(model, "flux", tcfg, opts),
            conditioning=FluxTextConditioning(clip, t5_tokens, opts["guidance_scale"], pooled=fam != "Chroma"),
            network_args={**VERBOSE, **flux.NETWORK_ARGS, **LORAPLUS_ARGS}, te_prefixes=flux.TE_PREFIXES,
            te_lrs={"clip_l": opts.get("text_encoder_lr1", 0.0),
                    "t5xxl": opts.get("text_encoder_lr3", 0.0) if train_t5 else 0.0},
            metadata={**registry.widget_metadata(opts, "flux"), "model_type": flux.model_type(fam),
                      "t5xxl_max_token_length": t5_tokens})  # flux_train_network.update_metadata
        return cls.train(model, clip, dataset, lora_config, tcfg, plan, opts, fam)


def check_flux_options(fam: str, opts: dict, tcfg: TrainConfig, node: str) -> None:
    """kohya's Flux options Kiln refuses, each with the reason and what to use instead."""
    if tcfg.memory.split_mode:
        raise KilnError(f"{node}: training_args split_mode: {flux.REFUSED['split_mode']}.")
    if opts["apply_t5_attn_mask"]:
        raise KilnError(f"{node}: apply_t5_attn_mask: {flux.REFUSED['apply_t5_attn_mask']}.")
    if fam == "Chroma" and opts["guidance_scale"] != 0:
        raise KilnError(f"{node}: Chroma is not guidance-distilled: kohya requires guidance_scale 0 for it (ComfyUI "
                        f"samples Chroma with guidance 0). Set guidance_scale to 0.")


class KilnTrainAnyModel(TrainNode):
    @classmethod
    def define_schema(cls):
        return train_schema(
            "KilnTrainAnyModel", "Train LoRA (any model)",
            "Trains a LoRA on a loaded model whose family has no preset (PixArt, HiDream, Lumina 2, ...) in place: the "
            "target from ComfyUI's model sampling, conditioning from the model's own extra_conds, LoRA on the "
            "attention and MLP layers of its repeated blocks, saved under ComfyUI's module names.", registry.ANY)

    @classmethod
    def execute(cls, model, clip, dataset: KilnDataset, lora_config: LoraConfig, **opts) -> io.NodeOutput:
        node = "Train LoRA (any model)"
        fam, tcfg = prepare(model, dataset, opts, None, node, cls, registry.ANY, LoraTrainable)
        sampling = cmodel.sampling(model, node)
        check_any_options(sampling.prediction, tcfg, node)
        net = model.model.diffusion_model
        lists = repeated_block_lists(net)
        lc = lora_config
        rules = block_linear_rules(lists, lc.rank, lc.alpha)
        count = len(select_targets(net, rules))
        if not count:
            raise KilnError(f"{node}: found no attention or MLP Linear layers in repeated blocks of this {fam} model "
                            f"({type(net).__name__}); it needs a family preset.")
        preset = cmodel.preset_node(model)
        note = (f"no family preset applied ({fam}, {type(net).__name__}, {sampling.prediction}): LoRA on {count} "
                f"attention/MLP Linear layers of {', '.join(f'{p} ({len(net.get_submodule(p))})' for p in lists)}, "
                f"saved as diffusion_model.<module path>")
        if preset:
            note += f"; {fam} has a preset: {preset} trains it with kohya's names and options"
        log.info("kiln: %s: %s", node, note)
        plan = FamilyPlan(
            node=node, rules=lambda n: rules, namer=lambda n: comfy_module_name,
            checkpoint_blocks=lambda n: [b for p in lists for b in n.get_submodule(p)],
            architecture=lambda n: f"comfyui-{fam}/lora", version=fam,
            objective=layer.objective(layer.FAMILIES[registry.ANY], sampling, tcfg, opts),
            conditioning=ModelConditioning(clip, model), copy_norm_inputs=True,
            network_args={**VERBOSE, **LORAPLUS_ARGS},
            metadata=registry.widget_metadata(opts, registry.ANY) if sampling.prediction == "flow" else {})
        trainable = LoraTrainable(lc, plan)
        run = run_training(model, clip, dataset, tcfg, plan, opts, cls.hidden.unique_id, trainable)
        run.notes.insert(0, note)
        return trainable.outputs(run, fam)


def comfy_module_name(path: str) -> str:
    """ComfyUI's own name of a module: the key its LoRA loader maps for any model (comfy/lora.py)."""
    return f"diffusion_model.{path}"


def check_any_options(prediction: str, tcfg: TrainConfig, node: str) -> None:
    """Options the model's parameterisation does not read, refused by name: the DDPM noise/loss keys on a flow
    model (the flow widgets are the flow draw), and huber's snr schedule there (kohya's needs a DDPM schedule)."""
    if prediction != "flow":
        return
    ddpm_only = [k for k in tcfg.training_args if "flux" not in registry.BY_NAME[k].families]
    if ddpm_only:
        raise KilnError(f"{node}: training_args {ddpm_only[0]} applies to DDPM (eps/v) models here; this model samples "
                        f"as flow (timestep_sampling, discrete_flow_shift and the other flow inputs set its draw). "
                        f"Remove it.")
    if "huber_schedule" not in tcfg.training_args:
        tcfg.loss.huber_schedule = "constant"  # kohya's snr schedule needs DDPM timesteps
