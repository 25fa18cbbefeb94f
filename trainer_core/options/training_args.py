"""kohya's training options as ``key=value`` text (the Train nodes' ``training_args`` input, and what
``cli.py --config`` hands them): the registry's training_args keys, with kohya's names, types, ranges and meaning.

About forty options do not belong as forty widgets; the few touched on every run stay widgets, the rest are
written here the way kohya users already write them. An unknown key is an error naming the closest valid
key; a wrong type or range is an error naming what is allowed.
"""
from __future__ import annotations

import ast
import difflib

from ..errors import KilnError
from .key_values import split_pairs
from .registry import TRAINING_ARGS, Option

# every key with its type, range, families and help: the option registry's training_args options
KEYS: dict[str, Option] = TRAINING_ARGS
KEY_ORDER = list(KEYS)


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


def _typed(key: str, spec: Option, raw: str):
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


def _range(spec: Option) -> str:
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
    """Every key this family reads, for the node's tooltip."""
    return "\n".join(f"{k}: {s.help}" for k, s in KEYS.items() if family in s.families)
