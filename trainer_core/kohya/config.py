"""kohya's training ``--config_file`` (TOML) as a Kiln graph, for the headless CLI: kohya users bring the
config they already have. Pure mapping, no ComfyUI: it returns an API-format prompt holding only what the
config sets (the CLI fills every other input with the node's own default) and the notes to print.

Keys keep kohya's names and meaning (sections such as ``[model_arguments]`` are flattened, as kohya does);
a key Kiln does not know is an error naming it, and keys that change nothing in Kiln are reported as such.
kohya's training options without a widget (the registry's training_args keys) go, as key=value lines, into the Train node's
``training_args`` input.
"""
from __future__ import annotations

import difflib
import tomllib

from ..errors import KilnError
from ..families import flux
from ..maths.optim import OPTIMIZERS, SCHEDULERS
from ..options.registry import ANY, TRAINING_ARGS, WIDGETS, kohya_widget_keys
from ..options.training_args import format_value, parse_training_args
from .dataset_flags import DATASET_FLAGS, FOLDERS
from .flags import SCRIPTS

TRAIN_NODE = {"sd1": "KilnTrainSD1", "sdxl": "KilnTrainSDXL", "sd3": "KilnTrainSD3", "flux": "KilnTrainFlux"}
NETWORK_MODULES = {"networks.lora": ("sd1", "sdxl"), "networks.lora_sd3": ("sd3",), "networks.lora_flux": ("flux",),
                   "lycoris.kohya": ("sd1", "sdxl", "sd3")}
# LyCORIS's algo= values Kiln trains (LoRA Config algorithm); DoRA is LyCORIS's lora/locon with dora_wd=True
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
LYCORIS_OTHER_ALGOS = ("glora", "ia3", "boft", "diag-oft", "oft", "dylora", "full", "tlora", "norms")
# LyCORIS network_args Kiln does not have
LYCORIS_REFUSED = {"use_tucker": "Tucker/CP decomposition", "use_cp": "Tucker/CP decomposition",
                   "use_scalar": "the trainable scalar", "decompose_both": "LoKr with both halves low rank",
                   "rank_dropout_scale": "rescaled rank dropout", "train_norm": "norm-layer training",
                   "bypass_mode": "bypass mode (Kiln picks the forward per algorithm)", "rs_lora": "rank-stabilised "
                   "scaling", "unbalanced_factorization": "unbalanced LoKr factorisation", "preset": "LyCORIS presets "
                   "(Kiln trains kohya's LoRA targets; conv_dim adds the convolutions)",
                   "constraint": "OFT constraints", "block_size": "OFT blocks", "rescaled": "OFT rescaling"}
PRECISION = {"no": "fp32", "fp32": "fp32", "float": "fp32", "fp16": "fp16", "bf16": "bf16"}

# kohya key -> Train node input (same value), from the option registry; the flow families' own widgets apart
WIDGET_KEYS = kohya_widget_keys()
# Train LoRA (any model) borrows the flow widgets (registry.ANY); no kohya script reads them for it
FLOW_KEYS = {fam: tuple(k for k, name in WIDGET_KEYS.items() if set(WIDGETS[name].families) - {ANY} <= {"sd3", "flux"}
                        and fam in WIDGETS[name].families) for fam in ("sd3", "flux")}
SD3_KEYS, FLUX_KEYS = FLOW_KEYS["sd3"], FLOW_KEYS["flux"]  # each family's own widgets (shared ones in both)
TRAIN_KEYS = {k: name for k, name in WIDGET_KEYS.items() if k not in SD3_KEYS + FLUX_KEYS}
HANDLED = {"pretrained_model_name_or_path", "text_encoder_lr1", "text_encoder_lr2", "text_encoder_lr3", "clip_l", "clip_g",
           "t5xxl", "dataset_config", "output_dir", "output_name", "save_precision",
           "network_module", "network_dim", "network_alpha", "network_dropout", "network_args", "unet_lr",
           "text_encoder_lr", "network_train_unet_only", "mixed_precision", "cache_latents_to_disk", "no_half_vae",
           "save_model_as", "network_weights", "dim_from_weights", "v_parameterization", "sample_prompts", "alpha_mask", "masked_loss", "vae"}
NO_EFFECT = {
    "cache_latents": "Kiln always caches latents", "cache_text_encoder_outputs": "frozen encoders' outputs are "
    "always kept in memory (with trained encoders it is refused, as kohya refuses it)", "sdpa": "attention is "
    "ComfyUI's choice", "xformers": "attention is ComfyUI's choice",
    "mem_eff_attn": "attention is ComfyUI's choice", "v2": "read from the model", "sdxl": "read from the model",
    "max_data_loader_n_workers": "latents are cached", "persistent_data_loader_workers": "latents are cached",
    "full_fp16": "trained weights (LoRA or DreamBooth) stay fp32", "full_bf16": "trained weights (LoRA or DreamBooth) "
    "stay fp32", "lowram": "ComfyUI manages memory", "highvram": "ComfyUI manages memory",
    "save_state": "Kiln writes a resumable .kiln-state beside every save_every_n_steps / save_every_n_epochs save "
    "(resume: that save)", "save_state_on_train_end": "the final file has no state; the intermediate saves do",
    "save_last_n_epochs_state": "a save's state is kept and removed with it (save_last_n_epochs)",
    "save_last_n_steps_state": "a save's state is kept and removed with it (save_last_n_steps)",
    "cache_info": "the latent cache is keyed by content", "skip_cache_check": "the latent cache is keyed by content",
    "console_log_level": "Kiln logs through ComfyUI's logging", "console_log_file": "Kiln logs through ComfyUI's "
    "logging", "console_log_simple": "Kiln logs through ComfyUI's logging", "log_config": "TensorBoard gets the "
    "losses, learning rates and samples; the run's settings are in the file's metadata",
    "ddp_timeout": "several processes all-reduce through Kiln's own step (no DDP wrapper)",
    "ddp_gradient_as_bucket_view": "no DDP wrapper", "ddp_static_graph": "no DDP wrapper",
    "dynamo_backend": "nothing is compiled", "tokenizer_cache_dir": "ComfyUI's tokenizers are local files",
    "disable_mmap_load_safetensors": "ComfyUI loads the model", "t5xxl_device": "ComfyUI places the text encoders",
    "t5xxl_dtype": "ComfyUI chooses the text encoders' dtype", "text_encoder_batch_size": "captions are encoded as "
    "the steps need them", "save_clip": "a LoRA run saves the LoRA", "save_t5xxl": "a LoRA run saves the LoRA",
    "zero_stage": "DeepSpeed is not used", "offload_optimizer_device": "DeepSpeed is not used",
    "offload_optimizer_nvme_path": "DeepSpeed is not used", "offload_param_device": "DeepSpeed is not used",
    "offload_param_nvme_path": "DeepSpeed is not used", "zero3_init_flag": "DeepSpeed is not used",
    "zero3_save_16bit_model": "DeepSpeed is not used", "fp16_master_weights_and_gradients": "DeepSpeed is not used",
    "training_comment": "not written (ss_training_comment is None); add it to the file's metadata afterwards",
    **{f"metadata_{k}": "not written: Kiln writes modelspec's architecture, title (output_name), date, resolution "
       "and hash; add it to the file's metadata afterwards" for k in (
           "title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
           "trigger_phrase", "preprocessor", "is_negative_embedding")},
}
# train_db.py's own keys (a config without network_module: DreamBooth, the whole model trains)
DREAMBOOTH_KEYS = {"learning_rate_te", "stop_text_encoder_training", "no_token_padding", "use_safetensors"}
TE_FILES = ("clip_l", "clip_g", "t5xxl")  # kohya's separate text-encoder files -> ComfyUI's CLIP loaders
FAMILY_TE_FILES = {"sd3": TE_FILES, "flux": ("clip_l", "t5xxl")}
# flux_train_network.py's own keys beside its widgets (FLUX_KEYS): the files and the model type
FLUX_FILE_KEYS = frozenset(("ae", "model_type"))
# why latents that are always cached rule an option out, and what Kiln offers instead
_CACHED = ("it needs new pixels every epoch, and Kiln always trains from cached latents (kohya refuses it together "
           "with cache_latents too)")
_UPLOAD = "Kiln does not upload anything (no network while training); upload the files in output_dir yourself"
# kohya keys Kiln refuses, with the reason and what to use; a key set to kohya's default (off, empty, 0) asks for
# nothing and is accepted (kohya_ss writes every key)
REFUSED = {
    "color_aug": f"{_CACHED}. flip_aug is supported (its mirror latents are cached as well)",
    "random_crop": f"{_CACHED}. Buckets crop each image once, centred (enable_bucket avoids most cropping)",
    "face_crop_aug_range": f"{_CACHED}. Crop the images around the face beforehand",
    "token_warmup_min": "kohya's caption token warm-up is not implemented; shuffle_caption and "
    "caption_tag_dropout_rate are", "token_warmup_step": "kohya's caption token warm-up is not implemented; "
    "shuffle_caption and caption_tag_dropout_rate are",
    "enable_wildcard": "caption wildcards ({a|b}) and multi-line captions are not expanded; write one caption per "
    "image",
    "resize_interpolation": "Kiln resizes with Lanczos (masks bilinear); remove it",
    "in_json": "kohya's fine-tuning metadata (in_json) is not read; use train_data_dir with N_name folders and "
    "caption files, or a dataset_config", "dataset_repeats": "it belongs to in_json's fine-tuning datasets, which are "
    "not read; use N_name folders or num_repeats in a dataset_config",
    "dataset_class": "a custom Python dataset class cannot be loaded; use train_data_dir or a dataset_config",
    "debug_dataset": "use Load Dataset's preview output in ComfyUI: it shows the training views (crop, flip, mask)",
    "conditioning_data_dir": "as a flag it is for ControlNet training, which Kiln does not do; for masked loss, set "
    "conditioning_data_dir in a dataset_config subset, with masked_loss",
    "deepspeed": "DeepSpeed is not used: several GPUs train through torchrun / accelerate launch started before "
    "cli.py (docs/multi-gpu.md); to save memory use blocks_to_swap, gradient_checkpointing or fused_backward_pass",
    "torch_compile": "Kiln trains ComfyUI's loaded model in place, not a compiled copy; remove it",
    **{k: _UPLOAD for k in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                            "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface",
                            "resume_from_huggingface", "async_upload")},
    "wandb_api_key": "wandb is not offered; log_with = tensorboard with logging_dir is",
    "wandb_run_name": "wandb is not offered; log_with = tensorboard with logging_dir is",
    "log_tracker_config": "a tracker config is for wandb; TensorBoard (logging_dir) needs none",
    "no_metadata": "Kiln always writes kohya's metadata (ComfyUI, A1111 and kohya's tools read it); strip it "
    "from the file afterwards if needed",
    "initial_epoch": "Kiln continues a run only from a save with its state: resume (or network_weights to start "
    "from a LoRA's weights)", "initial_step": "Kiln continues a run only from a save with its state: resume (or "
    "network_weights to start from a LoRA's weights)", "skip_until_initial_step": "Kiln continues a run only from a "
    "save with its state: resume",
    "network_train_text_encoder_only": "Kiln always trains the diffusion model's adapters; train the text "
    "encoders together with them (text_encoder_lr) or not at all",
    "base_weights": "merging LoRAs into the model before training is a workflow: Load LoRA nodes in front of the "
    "Train node (cli.py --workflow)", "base_weights_multiplier": "merging LoRAs into the model before training is a "
    "workflow: Load LoRA nodes in front of the Train node (cli.py --workflow)",
    "save_n_epoch_ratio": "give the interval itself: save_every_n_epochs",
    "output_config": "Kiln does not write kohya configs; keep the command (or its --config_file)",
    "lr_scheduler_timescale": "it sets kohya's inverse_sqrt schedule, which Kiln does not offer; use lr_scheduler "
    "or a class path in lr_scheduler_type",
    "enable_scaled_pos_embed": "SD3.5's rescaled position embeddings per resolution are not used: ComfyUI samples "
    "SD3.5 by cropping its fixed position-embedding grid, so Kiln trains with those same crops (a LoRA trained on "
    "rescaled embeddings would be used with others). Remove it; pos_emb_random_crop_rate is supported",
    "stop_text_encoder_training": "it is a train_db.py (DreamBooth) option; kohya's train_network.py (LoRA) has no "
    "such argument. Set the text-encoder learning rate to 0, or network_train_unet_only = true",
    "no_token_padding": "it is a train_db.py (DreamBooth) option; kohya's train_network.py (LoRA) has no such "
    "argument, and LoRA training pads captions as kohya does",
    "controlnet_model_name_or_path": "kohya's flux_train_network trains a LoRA with a ControlNet's residuals added "
    "to the model's blocks, which Kiln does not do; remove it (ControlNets apply at sampling time in ComfyUI)",
}
# a refused key at these values asks for nothing (kohya's defaults that are not off/empty/0)
HARMLESS = {"token_warmup_min": 1, "resize_interpolation": "area", "dataset_repeats": 1}
# kohya's old optimizer switches (train_util.get_optimizer): each names an optimizer_type
OPTIMIZER_SWITCHES = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}
# keys the CLI itself reads: the dataset the flags describe (dataset_flags.py), a resume, the VAE batch size
DATASET_KEYS = frozenset(DATASET_FLAGS) | frozenset(FOLDERS)
CLI_KEYS = frozenset(("resume", "vae_batch_size"))
# kohya's argparse defaults where Kiln's node defaults differ: an unset key trains as kohya would
KOHYA_DEFAULTS = {"learning_rate": 2e-6, "max_train_steps": 1600, "mixed_precision": "no"}


def comfyui_settings(cfg: dict) -> dict[str, object]:
    """ComfyUI command-line settings (attributes of comfy.cli_args.args) a kohya config implies, for cli.py to set
    before anything loads: fp8_base / fp8_base_unet load the diffusion model's weights as fp8 (--fp8_e4m3fn-unet),
    the way kohya casts them; the text encoders load as ComfyUI chooses."""
    return {"fp8_e4m3fn_unet": True} if cfg.get("fp8_base") or cfg.get("fp8_base_unet") else {}


def flatten(cfg: dict) -> dict:
    """kohya reads keys from any section of its config file."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(flatten(value))
        else:
            flat[key] = value
    return flat


# the Train node's text-encoder learning rates per family (kohya's text_encoder_lr list, in order)
TE_LRS = {"sd1": (), "sdxl": ("text_encoder_lr1", "text_encoder_lr2"),
          "sd3": ("text_encoder_lr1", "text_encoder_lr2", "text_encoder_lr3"),
          "flux": ("text_encoder_lr1", "text_encoder_lr3")}


def flux_files_check(cfg: dict, path: str) -> list[str]:
    """What kohya's flux_train_network needs besides the model, checked before anything loads: ae (the VAE) and
    the text encoders (clip_l and t5xxl; Chroma: t5xxl). Returns the notes to print."""
    if not cfg.get("ae"):
        raise KilnError(f"{path}: a Flux run needs ae (the FLUX.1 VAE file, ae.safetensors), as kohya's "
                        f"flux_train_network does.")
    if cfg.get("model_type", "flux") not in ("flux", "chroma"):
        raise KilnError(f"{path}: model_type {cfg['model_type']!r}: kohya's choices are flux and chroma.")
    chroma = cfg.get("model_type") == "chroma"
    if not cfg.get("t5xxl") and not cfg.get("clip_l"):
        raise KilnError(f"{path}: a Flux run needs its text encoder files, as kohya's flux_train_network loads them: "
                        f"t5xxl" + ("" if chroma else " and clip_l") + ".")
    if chroma and cfg.get("clip_l"):
        raise KilnError(f"{path}: model_type = \"chroma\" with clip_l: Chroma has no CLIP-L (kohya leaves it out); "
                        f"remove clip_l.")
    if not chroma and not cfg.get("clip_l"):
        raise KilnError(f"{path}: FLUX.1 needs clip_l (its pooled vector comes from CLIP-L) beside t5xxl.")
    if not cfg.get("t5xxl"):
        return ["no t5xxl: the context is CLIP-L's hidden states (ComfyUI's CLIP-L encode), which only a Flux "
                "made for a 768-wide context takes (cli.py checks the model's txt_in); FLUX.1 needs t5xxl"]
    return []


def te_rates(cfg: dict, family: str) -> dict[str, float]:
    """kohya's text-encoder learning rates per Train node input: text_encoder_lr (one number or a list; absent:
    learning_rate), 0 with network_train_unet_only; SD3 and Flux train T5 only when asked (train_t5xxl); Flux's
    list is (CLIP-L, T5-XXL), as kohya's lora_flux reads it."""
    names = list(TE_LRS[family]) or ["text_encoder_lr"]
    if cfg.get("network_train_unet_only"):
        return {n: 0.0 for n in names}
    lr = cfg.get("text_encoder_lr")
    if lr is None or lr == []:  # kohya: an empty list is unset, like no key at all -> learning_rate
        lr = cfg.get("learning_rate", KOHYA_DEFAULTS["learning_rate"])
    lrs = [float(x) for x in lr] if isinstance(lr, list) else [float(lr)]
    lrs = (lrs + [lrs[-1]] * len(names))[:len(names)]
    out = dict(zip(names, lrs))
    for name in names:  # sdxl/sd3_train_network's text_encoder_lr1/2/3 win over text_encoder_lr
        if name in cfg and name != "text_encoder_lr":
            out[name] = float(cfg[name])
    args = [a.replace(" ", "").lower() for a in cfg.get("network_args", [])]
    if family in ("sd3", "flux") and "train_t5xxl=true" not in args:
        out["text_encoder_lr3"] = 0.0
    return out


def _true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def lycoris_args(args: dict[str, str], path: str) -> dict:
    """LyCORIS's network_args (``algo``, ``factor``, ``full_matrix``, ``dora_wd``, ...) as LoRA Config inputs."""
    algo = args.pop("algo", "lora").strip().lower()
    if algo not in LYCORIS_ALGOS:
        known = "lora/locon, loha, lokr (dora: dora_wd=True)"
        what = "is a LyCORIS algorithm Kiln does not train" if algo in LYCORIS_OTHER_ALGOS else "is not a LyCORIS algorithm"
        raise KilnError(f"{path}: network_args algo={algo} {what}; use one of {known}.")
    inputs = {"algorithm": LYCORIS_ALGOS[algo]}
    for key in [k for k in args if k in LYCORIS_REFUSED]:
        value = args.pop(key)
        if key in ("preset", "constraint", "block_size") or _true(value):  # a switch set to False asks for nothing
            raise KilnError(f"{path}: network_args {key}={value}: Kiln does not offer {LYCORIS_REFUSED[key]}; "
                            f"remove it.")
    if _true(args.pop("dora_wd", "false")):
        if inputs["algorithm"] != "lora":
            raise KilnError(f"{path}: dora_wd=True with algo={algo}: Kiln trains DoRA on LoRA (algo=locon) only.")
        inputs["algorithm"] = "dora"
    if _true(args.pop("wd_on_output", "false")):
        raise KilnError(f"{path}: wd_on_output=True: Kiln's DoRA normalises per input channel (wd_on_output=False), "
                        f"the form ComfyUI's loader applies exactly; remove it.")
    if "factor" in args:
        inputs["factor"] = int(args.pop("factor"))
    if "full_matrix" in args:
        inputs["full_matrix"] = _true(args.pop("full_matrix"))
    if "dropout" in args:  # LyCORIS's dropout, trained as kohya's network_dropout (docs/kohya.md, differences)
        inputs["dropout"] = float(args.pop("dropout"))
    return inputs


def lora_config_inputs(cfg: dict, path: str = "config") -> dict:
    inputs = {"rank": int(cfg.get("network_dim", 4)), "alpha": float(cfg.get("network_alpha", 1.0)),
              "dropout": float(cfg.get("network_dropout") or 0.0)}
    fields = {"conv_dim": ("conv_rank", int), "conv_alpha": ("conv_alpha", float),
              "rank_dropout": ("rank_dropout", float), "module_dropout": ("module_dropout", float)}
    args: dict[str, str] = {}
    for arg in cfg.get("network_args", []):
        key, _, value = arg.partition("=")
        args[key.strip()] = value.strip()
    if cfg.get("network_module") == "lycoris.kohya":
        inputs.update(lycoris_args(args, path))
    rest = []
    for key, value in args.items():
        if key in fields:
            name, kind = fields[key]
            inputs[name] = kind(value)
        elif key != "train_t5xxl":
            rest.append(f"{key}={value}")
    inputs["network_args"] = " ".join(rest)
    return inputs


DREAMBOOTH_NODE = "KilnTrainDreamBooth"
# each node of a config's graph by what it does; the ids stay numbers (cli.py --set 6.steps=... addresses them)
ROLES = {"checkpoint": "1", "dataset": "2", "text_encoders": "3", "cache": "4", "lora_config": "5", "train": "6",
         "save": "7", "samples": "8", "mask": "9", "vae": "10", "v_prediction": "11"}


def dreambooth_checks(cfg: dict, path: str, family: str) -> None:
    """What a train_db.py config asks that Kiln does not do, refused by name."""
    if family != "sd1":
        raise KilnError(f"{path} has no network_module: a kohya train_db.py (DreamBooth) config, which Kiln runs on "
                        f"SD 1.x/2.x models (Train DreamBooth); this is a {family} model (kohya's sdxl_train.py is "
                        f"not offered). Add network_module = \"networks.lora\" to train a LoRA instead.")
    if cfg.get("no_token_padding"):
        raise KilnError(f"{path}: no_token_padding = true: ComfyUI's SD tokenizer always pads captions to 77 tokens, "
                        f"so Kiln cannot train without padding; remove the key.")
    if cfg.get("save_precision") not in (None, "float", "fp32"):
        raise KilnError(f"{path}: save_precision {cfg['save_precision']!r}: Train DreamBooth saves the checkpoint in "
                        f"the dtype ComfyUI loaded the model in; remove the key.")


def dreambooth_te_inputs(cfg: dict) -> dict:
    """train_db.py's text encoder: it trains unless stop_text_encoder_training is negative (or 0: stopped
    before the first step), at learning_rate_te, else learning_rate; a positive value stops it after that
    many steps."""
    stop = cfg.get("stop_text_encoder_training")
    lr = cfg.get("learning_rate_te")
    lr = cfg.get("learning_rate", 1e-6) if lr is None else lr
    if stop is not None and stop <= 0:
        return {"text_encoder_lr": 0.0, "stop_text_encoder_training": 0}
    return {"text_encoder_lr": float(lr), "stop_text_encoder_training": int(stop or 0)}


def check_dataset_masks(cfg: dict, dataset_text: str, path: str) -> None:
    """kohya's mask keys against the dataset TOML: conditioning_data_dir (mask images) is read only with
    masked_loss = true (kohya's schema refuses it otherwise), and --alpha_mask makes every subset use alpha masks,
    which Kiln cannot combine with a subset's mask folder."""
    try:
        data = tomllib.loads(dataset_text)
    except tomllib.TOMLDecodeError:
        return  # Load Dataset reports it, naming the file
    subsets = [s for d in data.get("datasets", []) for s in d.get("subsets", [])]
    folders = [s for s in subsets if "conditioning_data_dir" in s] + \
        ([data["general"]] if "conditioning_data_dir" in data.get("general", {}) else [])
    if folders and not cfg.get("masked_loss"):
        raise KilnError(f"{path}: the dataset config sets conditioning_data_dir (mask images), which kohya reads only "
                        f"with masked_loss = true; add masked_loss = true to train with those masks, or remove it.")
    if folders and cfg.get("alpha_mask"):
        raise KilnError(f"{path}: alpha_mask = true and a subset with conditioning_data_dir: Kiln masks a run either "
                        f"by alpha channels or by mask folders; remove one of them.")


def read_config(text: str, path: str) -> dict:
    """A kohya config file's keys, flattened as kohya reads them; the one place its TOML is parsed."""
    try:
        return flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise KilnError(f"{path} is not valid TOML: {e}") from None


def known_keys(dreambooth: bool = True) -> set[str]:
    """Every key the mapping reads, refuses with a reason or reports as having no effect."""
    known = set(TRAIN_KEYS) | set(SD3_KEYS) | set(FLUX_KEYS) | FLUX_FILE_KEYS | HANDLED | set(NO_EFFECT) \
        | set(TRAINING_ARGS) | set(REFUSED)
    known |= DATASET_KEYS | CLI_KEYS | set(OPTIMIZER_SWITCHES)
    return known | DREAMBOOTH_KEYS if dreambooth else known


def asks_for_something(key: str, value) -> bool:
    """Whether a refused key's value asks for anything: kohya_ss writes every key, most at off, empty or 0."""
    return value not in (None, False, "", 0, []) and value != HARMLESS.get(key)


def optimizer_from_switches(cfg: dict, path: str) -> dict:
    """kohya's use_8bit_adam / use_lion_optimizer as the optimizer_type they stand for; with another optimizer_type
    (or both) refused, as kohya refuses them."""
    on = [k for k in OPTIMIZER_SWITCHES if cfg.get(k)]
    cfg = {k: v for k, v in cfg.items() if k not in OPTIMIZER_SWITCHES}
    if len(on) > 1:
        raise KilnError(f"{path}: use_8bit_adam and use_lion_optimizer are both set (kohya stops on it too); give "
                        f"one, or optimizer_type.")
    if on and cfg.get("optimizer_type"):
        raise KilnError(f"{path}: {on[0]} and optimizer_type are both set (kohya stops on it too); use "
                        f"optimizer_type = \"{OPTIMIZER_SWITCHES[on[0]]}\" alone.")
    if on:
        cfg["optimizer_type"] = OPTIMIZER_SWITCHES[on[0]]
    return cfg


def node_of(prompt: dict, role: str) -> dict:
    """The node of ``role`` (ROLES) in a prompt graph_from_config made."""
    return prompt[ROLES[role]]


def graph_from_config(config: str | dict, path: str, family: str) -> tuple[dict, list[str]]:
    """(API-format prompt with only the inputs the config sets, notes) for ``family`` in sd1/sdxl/sd3/flux, from
    the config's text or its read_config keys. Each node's id is its role's (ROLES). A Flux model loads as kohya's
    flux_train_network loads it: the diffusion model (Load Diffusion Model), clip_l and t5xxl (ComfyUI's CLIP
    loaders) and ae (Load VAE)."""
    cfg = read_config(config, path) if isinstance(config, str) else dict(config)
    dreambooth = "network_module" not in cfg  # kohya's train_db.py
    known = known_keys(dreambooth)
    unknown = sorted(k for k in cfg if k not in known)
    others = [script for script, (_, flags) in SCRIPTS.items() if unknown and unknown[0] in flags]
    if others:
        this = "train_db.py (DreamBooth: no network_module)" if dreambooth else "LoRA (train_network.py)"
        raise KilnError(f"{path}: '{unknown[0]}' is a key of kohya's {' and '.join(others)}, not of a {this} "
                        f"config; kohya's script would stop on it too.")
    if unknown:
        near = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
        raise KilnError(f"{path}: '{unknown[0]}' is not a kohya training key Kiln knows"
                        + (f"; did you mean '{near[0]}'?" if near else "")
                        + " (docs/kohya.md lists every key; options beyond kohya's are in docs/training-args.md).")
    if "pretrained_model_name_or_path" not in cfg:
        raise KilnError(f"{path} has no pretrained_model_name_or_path: the CLI needs the checkpoint to train.")
    if not cfg.get("dataset_config") and not cfg.get("train_data_dir"):
        raise KilnError(f"{path} has no dataset: give dataset_config (a kohya dataset TOML) or train_data_dir (a "
                        f"folder of N_name sub-folders), as kohya needs one of them.")
    refusals = {**REFUSED, **(flux.REFUSED if family == "flux" else {})}  # Flux's own: the Train node says the same
    refused = [k for k in cfg if k in refusals and not (dreambooth and k in DREAMBOOTH_KEYS)
               and asks_for_something(k, cfg[k])]
    if refused:
        raise KilnError(f"{path}: {refused[0]} is refused: {refusals[refused[0]]}.")
    cfg = optimizer_from_switches(cfg, path)
    notes = []
    if dreambooth:
        dreambooth_checks(cfg, path, family)
    else:
        module = cfg["network_module"]
        if family == "sd3" and module == "networks.lora":  # kohya's own SD3 example writes it so
            module = "networks.lora_sd3"
            notes.append("network_module networks.lora on an SD3 model: trained as networks.lora_sd3 (kohya's SD3 LoRA)")
        if family not in NETWORK_MODULES.get(module, ()):
            raise KilnError(f"{path}: network_module {module!r} does not train a {family} model with Kiln (use "
                            f"networks.lora for SD1/SDXL, networks.lora_sd3 for SD3, networks.lora_flux for "
                            f"FLUX.1/Chroma, or lycoris.kohya for SD1/SDXL/SD3).")
    if cfg.get("save_model_as") not in (None, "", "safetensors"):
        raise KilnError(f"{path}: save_model_as {cfg['save_model_as']!r} is refused: Kiln writes .safetensors only "
                        f"(a LoRA in kohya's format, train_db a single-file checkpoint), which ComfyUI, A1111 and "
                        f"kohya load; .ckpt/.pt are pickles that can run code when loaded, and Diffusers folders are "
                        f"not ComfyUI's format. Use save_model_as = \"safetensors\" or leave it out.")

    own = FLOW_KEYS.get(family, ())
    for other, what in (("sd3", "an SD3 option (sd3_train_network.py)"), ("flux", "a flux_train_network.py option")):
        if family != other and any(k in cfg and k not in own for k in FLOW_KEYS[other]):
            key = next(k for k in FLOW_KEYS[other] if k in cfg and k not in own)
            raise KilnError(f"{path}: {key} is {what}; this is a {family} model.")
    if family != "flux" and any(k in cfg for k in FLUX_FILE_KEYS):
        raise KilnError(f"{path}: {next(k for k in FLUX_FILE_KEYS if k in cfg)} is a flux_train_network.py option; "
                        f"this is a {family} model.")
    if family in FLOW_KEYS and "min_snr_gamma" in cfg:
        raise KilnError(f"{path}: min_snr_gamma does not apply to {family} (rectified flow); use weighting_scheme.")
    if cfg.get("lr_scheduler", "constant") not in SCHEDULERS:
        raise KilnError(f"{path}: lr_scheduler {cfg['lr_scheduler']!r} is not one of {', '.join(SCHEDULERS)}; give "
                        f"another as lr_scheduler_type (a class path) with lr_scheduler_args.")
    te_keys = [k for k in ("text_encoder_lr1", "text_encoder_lr2", "text_encoder_lr3") if k in cfg]
    allowed = TE_LRS[family]
    if any(k not in allowed for k in te_keys):
        raise KilnError(f"{path}: {next(k for k in te_keys if k not in allowed)} does not exist for {family} "
                        f"(use {', '.join(allowed) or 'text_encoder_lr'}).")
    te_files = FAMILY_TE_FILES.get(family, ())
    if any(k in cfg and k not in te_files for k in TE_FILES):
        key = next(k for k in TE_FILES if k in cfg and k not in te_files)
        raise KilnError(f"{path}: {key} names a text-encoder file of another family; this is a {family} model "
                        + ("(its encoders are clip_l and t5xxl)." if family == "flux"
                           else "(its encoders come from the checkpoint)."))
    if family == "flux":
        notes += flux_files_check(cfg, path)
    notes += [f"{k}: no effect in Kiln ({NO_EFFECT[k]})" for k in cfg if k in NO_EFFECT]

    train = {TRAIN_KEYS[k]: v for k, v in cfg.items() if k in TRAIN_KEYS}
    train.update({k: v for k, v in cfg.items() if k in own})
    if cfg.get("dim_from_weights") and "network_weights" not in cfg:
        raise KilnError(f"{path}: dim_from_weights needs network_weights (the file to read the ranks from).")
    if cfg.get("resume"):  # the CLI finds the save (and its .kiln-state) that kohya's state folder stands for
        if "network_weights" in cfg:
            raise KilnError(f"{path}: resume and network_weights both say where training starts from; give one.")
        train["resume_from"] = cfg["resume"]
        notes.append(f"resume: training continues from {cfg['resume']} and its .kiln-state")
    if "network_weights" in cfg:  # the CLI registers the file's folder with ComfyUI and passes its name
        train["resume_from"] = cfg["network_weights"]
        notes.append(f"network_weights: training starts from {cfg['network_weights']} (its algorithm, rank and "
                     f"targets must match this config)")
    unset = {k: v for k, v in KOHYA_DEFAULTS.items() if k not in cfg}
    if "max_train_epochs" in cfg:
        unset.pop("max_train_steps", None)
    if "unet_lr" in cfg:
        unset.pop("learning_rate", None)
    if unset:  # kohya's defaults, not the Train node's
        cfg = {**unset, **cfg}
        train.update({TRAIN_KEYS[k]: v for k, v in unset.items() if k in TRAIN_KEYS})
        notes.append("not set, so kohya's defaults: " + ", ".join(f"{k} = {v}" for k, v in unset.items()))
    if "seed" not in cfg:
        notes.append("seed not set: kohya draws a random one; Kiln uses 0, so runs repeat")
    if "unet_lr" in cfg:
        train["learning_rate"] = cfg["unet_lr"]
    train["precision"] = PRECISION.get(str(cfg["mixed_precision"]), "auto")
    train.update(dreambooth_te_inputs(cfg) if dreambooth else te_rates(cfg, family))
    trained = [] if dreambooth else [k for k, v in te_rates(cfg, family).items() if v > 0]
    cached = [k for k in ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk") if cfg.get(k)]
    if trained and cached:  # kohya: "network for Text Encoder cannot be trained with caching Text Encoder outputs"
        raise KilnError(f"{path}: {cached[0]} = true while the text encoders train ({', '.join(trained)} > 0; kohya "
                        f"trains them at learning_rate unless told otherwise): cached outputs cannot change. As kohya "
                        f"does, this is refused: add network_train_unet_only = true, or remove {cached[0]}.")
    widget_fits = {"optimizer_type": lambda v: str(v).lower() in {o.lower() for o in OPTIMIZERS},
                   "lr_warmup_steps": lambda v: isinstance(v, int)}
    for key, fits in widget_fits.items():  # a kohya name / a step count fits the widget; else training_args
        if key in cfg and fits(cfg[key]):
            value = cfg[key]
            train[TRAIN_KEYS[key]] = next(o for o in OPTIMIZERS if o.lower() == str(value).lower()) \
                if key == "optimizer_type" else value
        elif key in cfg:
            train.pop(TRAIN_KEYS[key], None)
    if cfg.get("sample_prompts"):  # kohya's prompt file (the CLI resolves its path); kohya samples with DDIM unless told
        train["sample_prompts"] = cfg["sample_prompts"]
        if "sample_sampler" not in cfg:
            cfg = {**cfg, "sample_sampler": "ddim"}
            notes.append("sample_sampler not set: previews use kohya's default, ddim (ComfyUI's ddim / ddim_uniform)")
    args = "\n".join(f"{k}={format_value(v)}" for k, v in cfg.items()
                     if k in TRAINING_ARGS and v is not None and not (k in widget_fits and widget_fits[k](v)))
    if args:
        try:
            parse_training_args(args, family, path)  # a bad value is named with the config file, before loading
        except KilnError as e:
            raise KilnError(str(e).replace("training_args key", "key")) from None
        train["training_args"] = args
    if cfg.get("save_every_n_steps") or cfg.get("save_every_n_epochs"):
        train["save_name"] = cfg.get("output_name", "last")  # kohya: <output_name>-000001, -step00000500
    files = [cfg[k] for k in TE_FILES if cfg.get(k)]  # in kohya's order: clip_l, clip_g, t5xxl
    prompt: dict[str, dict] = {}

    def add(role: str, class_type: str, **inputs) -> dict:
        prompt[ROLES[role]] = {"class_type": class_type, "inputs": inputs}
        return inputs

    def out(role: str, index: int) -> list:
        return [ROLES[role], index]

    if family == "flux":  # kohya's Flux file is the diffusion model alone (the VAE is ae, the encoders separate)
        add("checkpoint", "UNETLoader", unet_name=cfg["pretrained_model_name_or_path"], weight_dtype="default")
    else:
        add("checkpoint", "CheckpointLoaderSimple", ckpt_name=cfg["pretrained_model_name_or_path"])
    # the dataset TOML, or train_data_dir, which the CLI turns into the TOML kohya's dataset flags describe
    add("dataset", "KilnLoadDataset", folder=cfg.get("dataset_config") or cfg["train_data_dir"])
    cache = add("cache", "KilnCacheLatents", dataset=out("dataset", 0), vae=out("checkpoint", 2),
                disk_cache=bool(cfg.get("cache_latents_to_disk", False)), no_half_vae=bool(cfg.get("no_half_vae", False)))
    if cfg.get("vae_batch_size"):  # kohya's VAE batch size while caching latents
        cache["batch_size"] = int(cfg["vae_batch_size"])
    train.update(model=out("checkpoint", 0), clip=out("text_encoders" if files else "checkpoint", 0 if files else 1),
                 dataset=out("cache", 0))
    if dreambooth:  # the trained MODEL and CLIP with the checkpoint's own VAE, as kohya's train_db saves them
        add("train", DREAMBOOTH_NODE, **train)
        add("save", "KilnSaveCheckpoint", model=out("train", 0), clip=out("train", 1), vae=out("checkpoint", 2),
            filename=cfg.get("output_name", "last"), overwrite=True)
    else:
        add("lora_config", "KilnLoraConfig", **lora_config_inputs(cfg, path))
        train["lora_config"] = out("lora_config", 0)
        add("train", TRAIN_NODE[family], **train)
        add("save", "KilnSaveLora", lora=out("train", 1), filename=cfg.get("output_name", "last"), overwrite=True,
            # unset: kohya saves in the trained dtype, fp32 for LoRA weights
            precision=PRECISION.get(str(cfg.get("save_precision", "fp32")), "fp32"))
    train = prompt[ROLES["train"]]["inputs"]
    if cfg.get("v_parameterization"):  # kohya trusts the flag: the model is trained (and sampled) as v-prediction
        if family in FLOW_KEYS:
            raise KilnError(f"{path}: v_parameterization does not apply to {family.upper()} (rectified flow).")
        add("v_prediction", "ModelSamplingDiscrete", model=out("checkpoint", 0), sampling="v_prediction", zsnr=False)
        train["model"] = out("v_prediction", 0)
    if cfg.get("vae") or family == "flux":  # kohya's --vae (Flux: --ae): latents and previews use this VAE
        add("vae", "VAELoader", vae_name=cfg.get("ae") if family == "flux" else cfg["vae"])
        cache["vae"] = out("vae", 0)
    if cfg.get("alpha_mask"):  # kohya's --alpha_mask: every subset's loss masked by its images' alpha channel
        add("mask", "KilnMaskSource", dataset=out("dataset", 0), mode="alpha", mask_folder="",
            missing_mask_is_white=True, dilation=0)
        cache["dataset"] = out("mask", 0)
    if cfg.get("sample_prompts"):  # kohya writes its samples to files; here ComfyUI's output folder
        add("samples", "SaveImage", images=out("train", 2), filename_prefix=f"{cfg.get('output_name', 'last')}_sample")
    if files:  # separate encoder files, as kohya's --clip_l/--clip_g/--t5xxl: ComfyUI's own CLIP loaders
        names = {f"clip_name{i + 1}": f for i, f in enumerate(files)}
        if family == "flux":  # FLUX.1: CLIP-L + T5-XXL; Chroma: T5-XXL alone; CLIP-L alone: its plain encode
            if len(files) == 2:
                add("text_encoders", "DualCLIPLoader", **names, type="flux")
            else:
                add("text_encoders", "CLIPLoader", clip_name=files[0],
                    type="chroma" if cfg.get("t5xxl") else "stable_diffusion")
        elif len(files) == 3:
            add("text_encoders", "TripleCLIPLoader", **names)
        elif len(files) == 2:
            add("text_encoders", "DualCLIPLoader", **names, type="sd3")
        else:
            add("text_encoders", "CLIPLoader", clip_name=files[0], type="sd3")
    return prompt, notes
