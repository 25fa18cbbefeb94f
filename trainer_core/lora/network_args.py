"""kohya's ``--network_args`` ("key=value" pairs) as typed values, checked against what a family reads.

LoRA Config takes them as text so that kohya users can paste the arguments they already use; each
Train node states which keys it understands, and anything else is an error that names the key.
"""
from __future__ import annotations

from ..errors import KilnError
from ..options.key_values import split_pairs


def parse_network_args(text: str) -> dict[str, str]:
    """``"a=1 b=[1,2, 3]\\nc = all"`` -> {"a": "1", "b": "[1,2, 3]", "c": "all"}: a value runs to the next
    ``key=``, so lists and block ranges keep their commas and spaces."""
    return split_pairs(text, "network_args", "'context_attn_dim=16 train_block_indices=0-11'")


def check_keys(args: dict[str, str], allowed: dict[str, str], node: str) -> None:
    """``allowed`` maps each key to a one-line description (shown when an unknown key is given)."""
    unknown = [k for k in args if k not in allowed]
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise KilnError(f"{node}: network_args key '{unknown[0]}' is not used by this node. Keys it reads: {known}.")


def bool_arg(args: dict[str, str], key: str) -> bool:
    """kohya's string booleans ("True", "true", "1", "yes")."""
    return args.get(key, "").strip().lower() in ("true", "1", "yes")


def int_arg(args: dict[str, str], key: str, default: int | None = None) -> int | None:
    if key not in args:
        return default
    try:
        value = int(args[key])
    except ValueError:
        raise KilnError(f"network_args: {key} must be an integer, got {args[key]!r}.") from None
    if value < 0:
        raise KilnError(f"network_args: {key} must be 0 or more (0 = no LoRA there), got {value}.")
    return value


def int_list_arg(args: dict[str, str], key: str, length: int) -> list[int] | None:
    if key not in args:
        return None
    raw = args[key].strip().strip("[]")
    try:
        values = [int(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise KilnError(f"network_args: {key} must be {length} integers like [0,0,4,0,0,0], got {args[key]!r}.") from None
    if len(values) != length or min(values) < 0:
        raise KilnError(f"network_args: {key} must be {length} integers ≥ 0, got {args[key]!r}.")
    return values


def block_selection(text: str | None, total: int, key: str = "train_block_indices") -> list[bool]:
    """kohya's block selection: "all", "none", or indices and ranges such as "0,1,4-5,7"."""
    if text is None or text.strip() == "all":
        return [True] * total
    text = text.strip()
    if text in ("none", ""):
        return [False] * total
    chosen = [False] * total
    for part in text.split(","):
        part = part.strip()
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise KilnError(f"network_args: {key} must look like 'all', 'none' or '0,1,4-5', got {text!r}.") from None
        if not (0 <= lo <= hi < total):
            raise KilnError(f"network_args: {key} '{part}' is outside the model's blocks 0-{total - 1}.")
        for i in range(lo, hi + 1):
            chosen[i] = True
    return chosen
