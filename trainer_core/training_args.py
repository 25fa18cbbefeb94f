"""kohya's training options as ``key=value`` text (the Train nodes' ``training_args`` input, and what
``cli.py --config`` hands them): one table of keys with kohya's names, types, ranges and meaning.

About forty options do not belong as forty widgets; the few touched on every run stay widgets, the rest are
written here the way kohya users already write them. An unknown key is an error naming the closest valid
key; a wrong type or range is an error naming what is allowed.
"""
from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass

from .errors import KilnError
from .sample_prompts import SAMPLERS

ALL = ("sd1", "sdxl", "sd3")
DDPM = ("sd1", "sdxl")  # noise and loss options kohya applies to the DDPM families only


@dataclass(frozen=True)
class Key:
    kind: str                      # int, float, bool, choice, str, steps (int, or a float < 1 = ratio), kwargs
    default: object
    help: str
    low: float | None = None       # inclusive bounds
    high: float | None = None
    choices: tuple = ()
    families: tuple = ALL


KEYS: dict[str, Key] = {
    # epochs and saving (kohya counts an epoch as every image × repeats once, reg images balanced)
    "max_train_epochs": Key("int", None, "train this many epochs (overrides steps)", 1),
    "save_every_n_epochs": Key("int", None, "also write the LoRA (+ a resumable state) every N epochs", 1),
    "save_last_n_epochs": Key("int", None, "keep only the last N epoch saves (older ones removed)", 1),
    "save_last_n_steps": Key("int", None, "keep step saves of the last N steps only (older ones removed)", 1),
    "sample_every_n_epochs": Key("int", None, "preview a sample every N epochs", 1),
    # noise (SD1/SDXL)
    "noise_offset": Key("float", None, "offset noise strength (~0.1)", 0.0, 1.0, families=DDPM),
    "noise_offset_random_strength": Key("bool", False, "offset strength drawn in [0, noise_offset]", families=DDPM),
    "adaptive_noise_scale": Key("float", None, "add |latent mean| × this to noise_offset", -1.0, 1.0, families=DDPM),
    "multires_noise_iterations": Key("int", None, "pyramid (multires) noise levels (6-10)", 1, 64, families=DDPM),
    "multires_noise_discount": Key("float", 0.3, "weight discount per multires level", 0.0, 1.0, families=DDPM),
    "ip_noise_gamma": Key("float", None, "input perturbation noise (~0.1)", 0.0, 1.0, families=DDPM),
    "ip_noise_gamma_random_strength": Key("bool", False, "perturbation drawn in [0, ip_noise_gamma]", families=DDPM),
    "zero_terminal_snr": Key("bool", False, "rescale the noise schedule to zero terminal SNR", families=DDPM),
    "min_timestep": Key("int", None, "lowest training timestep (0-999)", 0, 999),
    "max_timestep": Key("int", None, "highest training timestep, exclusive (1-1000)", 1, 1000),
    # loss
    "huber_schedule": Key("choice", "snr", "huber_c over timesteps (loss_type huber/smooth_l1)",
                          choices=("constant", "exponential", "snr")),
    "huber_c": Key("float", 0.1, "Huber threshold (loss_type huber/smooth_l1)", 1e-6, 1.0),
    "huber_scale": Key("float", 1.0, "Huber threshold scale (constant/exponential schedules)", 1e-6, 100.0),
    "v_pred_like_loss": Key("float", None, "add a v-prediction-like loss × this", 0.0, 100.0, families=DDPM),
    "debiased_estimation_loss": Key("bool", False, "weight the loss by 1/√SNR (v: 1/(SNR+1))", families=DDPM),
    "scale_v_pred_loss_like_noise_pred": Key("bool", False, "scale a v loss like an ε loss (SNR/(SNR+1))",
                                             families=DDPM),
    # optimizer and schedule (the node's optimizer / lr_scheduler / warmup_steps widgets stay; these refine them)
    "optimizer_type": Key("str", "", "overrides the optimizer widget: a kohya name or a class path such as "
                          "pytorch_optimizer.CAME or torch.optim.RAdam"),
    "optimizer_args": Key("kwargs", None, "optimizer keyword arguments, e.g. [weight_decay=0.1 betas=0.9,0.99]"),
    "lr_warmup_steps": Key("steps", None, "overrides warmup_steps; below 1 = that fraction of all steps", 0),
    "lr_decay_steps": Key("steps", 0, "decay steps of warmup_stable_decay; below 1 = fraction of all steps", 0),
    "lr_scheduler_num_cycles": Key("int", 1, "restarts of cosine_with_restarts (cycles of the min-lr schedules)", 1),
    "lr_scheduler_power": Key("float", 1.0, "power of the polynomial schedule", 0.0, 100.0),
    "lr_scheduler_min_lr_ratio": Key("float", None, "lowest lr as a fraction (cosine_with_min_lr, "
                                     "warmup_stable_decay)", 0.0, 1.0),
    "lr_scheduler_type": Key("str", "", "a scheduler class path, e.g. torch.optim.lr_scheduler.StepLR (overrides "
                             "lr_scheduler)"),
    "lr_scheduler_args": Key("kwargs", None, "scheduler keyword arguments, e.g. [step_size=100 gamma=0.5]"),
    # validation loss (kohya >= 0.10)
    "validation_split": Key("float", None, "fraction of each folder's images held out for a validation loss",
                            0.0, 0.9),
    "validation_seed": Key("int", None, "seed of the split and of the validation noise (default: seed)", 0),
    "validate_every_n_steps": Key("int", None, "also measure the validation loss every N steps", 1),
    "validate_every_n_epochs": Key("int", None, "measure it every N epochs (default: every epoch)", 1),
    "max_validation_steps": Key("int", None, "use at most N validation batches", 1),
    # text encoders (SD1/SD2, SDXL)
    "max_token_length": Key("int", None, "caption tokens trained: 75, 150 or 225 (kohya's 1-3 windows of 75; "
                            "longer captions are cut, with a warning)", 75, 225, families=DDPM),
    "clip_skip": Key("int", None, "train (and preview) with the CLIP's Nth layer from the end, 2 = penultimate, "
                     "as CLIP Set Last Layer -N; SD1/SD2 (kohya ignores it for SDXL)", 1, 12, families=("sd1",)),
    # sample previews (kohya's sample_* options; prompts go in the node's sample_prompts)
    "sample_sampler": Key("choice", None, "preview sampler by kohya's name (ddim, euler, euler_a, dpmsolver++, "
                          "...; mapped onto ComfyUI's samplers); a prompt's --ss overrides it",
                          choices=tuple(SAMPLERS)),
    "sample_at_first": Key("bool", False, "also preview before the first step"),
    "fused_backward_pass": Key("bool", False, "step each parameter as soon as its gradient is ready (less "
                               "memory); not with grad_accum > 1, max_grad_norm > 0, fp16, Prodigy/D-Adaptation"),
    # memory (block_swap.py; the base weights' dtype is ComfyUI's to choose when it loads them)
    "blocks_to_swap": Key("int", 0, "keep the weights of the network's last N blocks in host memory; each visits "
                          "the device only for its forward and backward (SD3: joint blocks; SD1/SDXL: the UNet's "
                          "ResBlocks, transformers and resamplers)", 0),
    "cpu_offload_checkpointing": Key("bool", False, "with gradient_checkpointing: keep each checkpointed block's "
                                     "saved inputs in host memory until its backward (not with blocks_to_swap)"),
    "fp8_base": Key("bool", False, "kohya's fp8 base model: requires a MODEL whose weights ComfyUI loaded as fp8 (Load "
                    "Diffusion Model, weight_dtype fp8_e4m3fn; cli.py loads a kohya config's model so)"),
    "fp8_base_unet": Key("bool", False, "as fp8_base, for the diffusion model only (the text encoders as loaded)"),
    # logging (tracking.py): TensorBoard event files, kohya's folder layout and tags
    "logging_dir": Key("str", None, "write loss, learning rates, validation loss and samples as TensorBoard "
                       "events under this folder (needs: pip install tensorboard)"),
    "log_prefix": Key("str", None, "prefix of the run's folder name (before its timestamp)"),
    "log_with": Key("choice", None, "tensorboard (the only backend; wandb is refused)",
                    choices=("tensorboard", "wandb", "all")),
    "log_tracker_name": Key("str", None, "sub-folder of the run (default: network_train)"),
    # beyond kohya: an exponential moving average of the trained weights (ema.py)
    "ema_decay": Key("float", 0.0, "keep an EMA of the trained weights (e.g. 0.999; 0 = off): saves, previews, "
                     "validation loss and the output use it", 0.0, 0.99999),
    "ema_update_every": Key("int", 1, "update the EMA every N optimizer steps", 1),
    "ema_warmup": Key("bool", True, "EMA decay min(ema_decay, (1+n)/(10+n)) at the n-th update, so the first "
                      "updates follow the weights"),
    "ema_on_host": Key("bool", False, "keep the EMA in host memory, not on the training device"),
    # beyond kohya's form: prior preservation without regularization images (preservation.py)
    "diff_output_preservation": Key("bool", False, "keep the prediction for each caption with its trigger "
                                    "replaced by the class (sks dog -> dog) at the base model's (adapters off)"),
    "diff_output_preservation_multiplier": Key("float", 1.0, "weight of that preservation loss", 0.0, 1000.0),
    "diff_output_preservation_trigger": Key("str", "", "the trigger words (default: from the dataset: the "
                                            "subset's class_tokens)"),
    "diff_output_preservation_class": Key("str", "", "the class words that replace them (default: the N_name "
                                          "folder's name)"),
}
KEY_ORDER = list(KEYS)


def split_pairs(text: str, what: str = "training_args") -> dict[str, str]:
    """``"a=1 b=[x=1, y=2]\\nc='p q'"`` -> {"a": "1", "b": "[x=1, y=2]", "c": "p q"}: a value runs to the
    next ``key=`` outside brackets and quotes, so lists, ranges and nested arguments keep their commas."""
    inside, depth, quote = [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        inside.append(bool(quote) or depth > 0 or ch in "\"'")
    keys = [m for m in re.finditer(r"(?:^|(?<=[\s,;]))([A-Za-z_][\w.]*)\s*=", text) if not inside[m.start()]]
    stripped = text.strip()
    if stripped and (not keys or text[:keys[0].start()].strip(" \n\t,;")):
        raise KilnError(f"{what}: cannot read {stripped!r}; write key=value pairs, one per line, e.g. "
                        f"'max_train_epochs=10' or 'optimizer_args=[weight_decay=0.1 betas=0.9,0.99]'.")
    pairs: dict[str, str] = {}
    for m, nxt in zip(keys, keys[1:] + [None]):
        key = m.group(1)
        value = text[m.end():nxt.start() if nxt else len(text)].strip(" \n\t,;")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key in pairs:
            raise KilnError(f"{what}: '{key}' is given twice.")
        pairs[key] = value
    return pairs


def kwargs_value(raw: str, key: str) -> dict[str, object]:
    """kohya's optimizer_args / lr_scheduler_args: ``[weight_decay=0.1 betas=0.9,0.99]`` -> keyword arguments,
    each value read as a Python literal when it is one (``0.9,0.99`` -> a tuple), else kept as text."""
    inner = raw.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    out: dict[str, object] = {}
    for k, v in split_pairs(inner.replace('"', " ").replace("'", " "), key).items():
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _typed(key: str, spec: Key, raw: str):
    def bad(allowed: str):
        return KilnError(f"training_args: {key} must be {allowed}, got {raw!r}.")

    value = raw.strip()
    if spec.kind == "bool":
        if value.lower() in ("true", "1", "yes", ""):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise bad("true or false")
    if spec.kind == "choice":
        if value not in spec.choices:
            raise bad("one of " + ", ".join(spec.choices))
        return value
    if spec.kind in ("str",):
        if not value:
            raise bad("a name")
        return value
    if spec.kind == "kwargs":
        return kwargs_value(value, key)
    try:
        if spec.kind == "int":
            number = int(value)
        elif spec.kind == "steps":  # kohya's int_or_float: < 1 is a fraction of the total steps
            number = float(value)
            if number >= 1:
                if number != int(number):
                    raise ValueError
                number = int(number)
        else:
            number = float(value)
    except ValueError:
        raise bad({"int": "an integer", "steps": "a step count, or a fraction < 1 of all steps"}.get(spec.kind, "a number")
                  + _range(spec)) from None
    if (spec.low is not None and number < spec.low) or (spec.high is not None and number > spec.high):
        raise bad(("an integer" if spec.kind == "int" else "a number") + _range(spec))
    return number


def _range(spec: Key) -> str:
    if spec.low is not None and spec.high is not None:
        return f" from {spec.low:g} to {spec.high:g}"
    if spec.low is not None:
        return f" of at least {spec.low:g}"
    return ""


def parse_training_args(text: str, family: str, node: str) -> dict[str, object]:
    """The typed values of ``training_args`` (only the keys given); unknown keys, keys that do not apply to
    ``family`` and bad values are errors that say what to write instead."""
    out: dict[str, object] = {}
    for key, raw in split_pairs(text or "").items():
        spec = KEYS.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, KEY_ORDER, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise KilnError(f"{node}: training_args key '{key}' is not a known kohya option.{hint} Keys: "
                            f"{', '.join(KEY_ORDER)}.")
        if family not in spec.families:
            raise KilnError(f"{node}: training_args key '{key}' does not apply to {family} (kohya uses it for "
                            f"{'/'.join(spec.families)} only); remove it.")
        out[key] = _typed(key, spec, raw)
    lo, hi = out.get("min_timestep", 0), out.get("max_timestep", 1000)
    if lo > hi:  # equal is allowed: kohya then trains that one timestep
        raise KilnError(f"{node}: training_args min_timestep ({lo}) must not be above max_timestep ({hi}).")
    if out.get("max_token_length", 75) not in (75, 150, 225):
        raise KilnError(f"{node}: training_args max_token_length must be 75, 150 or 225 (kohya's windows of 75 "
                        f"tokens), got {out['max_token_length']}.")
    if out.get("blocks_to_swap") and out.get("cpu_offload_checkpointing"):  # kohya refuses the pair too
        raise KilnError(f"{node}: training_args blocks_to_swap and cpu_offload_checkpointing cannot be combined; "
                        f"use one of them.")
    if "save_last_n_epochs" in out and "save_every_n_epochs" not in out:
        raise KilnError(f"{node}: training_args save_last_n_epochs needs save_every_n_epochs (what to keep).")
    return out


def format_value(value) -> str:
    """A config value (TOML) as training_args text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(str(v) for v in value) + "]"
    return str(value)


def effective(args: dict[str, object]) -> str:
    """The settings given, as the node's output text lists them."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in args.items())


def describe(family: str) -> str:
    """Every key this family reads, for the node's tooltip and the README."""
    return "\n".join(f"{k}: {s.help}" for k, s in KEYS.items() if family in s.families)
