"""kohya's block-wise LoRA settings for SD1/SDXL UNets (networks/lora.py network_args), as data: per-block
learning-rate multipliers (``down_lr_weight``/``mid_lr_weight``/``up_lr_weight``, lists or presets, with
``block_lr_zero_threshold``), per-block ranks and alphas (``block_dims``/``block_alphas``,
``conv_block_dims``/``conv_block_alphas``), and LoRA+ ratios.

Blocks, as kohya numbers them (a module's block comes from its kohya name):
* SD1/SD2: 25 = 12 down + 1 mid + 12 up. down_blocks.i.(resnets|attentions).j -> 1 + 3i + j, downsamplers ->
  1 + 3i + 2 (block 0, conv_in, never has a LoRA); mid_block -> 12; up_blocks.i... -> 13 + 3i + j.
* SDXL: 23 = 1 + 9 input + 3 middle + 9 output + 1: input_blocks.N -> 1 + N, middle_block.N -> 10 + N,
  output_blocks.N -> 13 + N (0 and 22, the embeddings and ``out``, have no LoRA and weight 1).
Presets (n = 12 for SD1, 9 for SDXL; ``name+base`` adds base to each): sine sin(π/2·i/(n−1)), cosine the
same reversed, linear i/(n−1), reverse_linear reversed, zeros 0. A list shorter than n is filled with 1,
longer is cut; weights ≤ block_lr_zero_threshold become 0, and a block at 0 gets no LoRA at all.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import KilnError

NUM_BLOCKS = {False: 12, True: 9}      # down (= up) blocks: SD1, SDXL
NUM_MID = {False: 1, True: 3}
PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")

NETWORK_ARGS = {
    "down_lr_weight": "learning-rate multipliers of the down/input blocks: a list or a preset (sine, cosine, "
                      "linear, reverse_linear, zeros, optionally +base)",
    "mid_lr_weight": "learning-rate multiplier(s) of the mid block(s)",
    "up_lr_weight": "learning-rate multipliers of the up/output blocks (list or preset)",
    "block_lr_zero_threshold": "multipliers at or below this become 0 (that block gets no LoRA)",
    "block_dims": "rank per block (25 numbers for SD1, 23 for SDXL)",
    "block_alphas": "alpha per block",
    "conv_block_dims": "3x3-conv rank per block",
    "conv_block_alphas": "3x3-conv alpha per block",
    "loraplus_lr_ratio": "LoRA+: the up matrices learn this many times faster",
    "loraplus_unet_lr_ratio": "LoRA+ ratio of the UNet (overrides loraplus_lr_ratio)",
    "loraplus_text_encoder_lr_ratio": "LoRA+ ratio of the text encoders (overrides loraplus_lr_ratio)",
}


def total_blocks(is_sdxl: bool) -> int:
    n, mid = NUM_BLOCKS[is_sdxl], NUM_MID[is_sdxl]
    return 2 * n + mid + (2 if is_sdxl else 0)


def preset(spec: str, n: int) -> list[float]:
    name, _, base = spec.partition("+")
    try:
        base_lr = float(base) if base else 0.0
    except ValueError:
        raise KilnError(f"network_args: lr weight preset {spec!r}: the part after '+' must be a number.") from None
    steps = [i / (n - 1) for i in range(n)]
    curves = {"sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps, "zeros": [0.0] * n}
    curves["cosine"] = curves["sine"][::-1]
    curves["reverse_linear"] = steps[::-1]
    if name not in curves:
        raise KilnError(f"network_args: unknown lr weight preset {name!r}; one of {', '.join(PRESETS)} or a list.")
    return [v + base_lr for v in curves[name]]


def _floats(key: str, text: str) -> list[float]:
    try:
        return [float(s) if s.strip() else 0.0 for s in text.strip().strip("[]").split(",")]
    except ValueError:
        raise KilnError(f"network_args: {key} must be numbers separated by commas, got {text!r}.") from None


def _fit(values: list[float], n: int) -> list[float]:
    return (values + [1.0] * n)[:n]


def block_lr_weights(args: dict[str, str], is_sdxl: bool) -> list[float] | None:
    """kohya's get_block_lr_weight: one multiplier per block, or None when no *_lr_weight is given."""
    keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
    if not any(k in args for k in keys):
        return None
    n, mid = NUM_BLOCKS[is_sdxl], NUM_MID[is_sdxl]
    threshold = float(args.get("block_lr_zero_threshold", 0.0))

    def part(key: str, length: int) -> list[float]:
        if key not in args:
            return [1.0] * length
        text = args[key].strip()
        values = _floats(key, text) if ("," in text or key == "mid_lr_weight") else preset(text, length)
        return [w if w > threshold else 0.0 for w in _fit(values, length)]

    weights = part("down_lr_weight", n) + part("mid_lr_weight", mid) + part("up_lr_weight", n)
    return [1.0] + weights + [1.0] if is_sdxl else weights


def block_index(name: str, is_sdxl: bool) -> int:
    """kohya's get_block_index for a UNet LoRA name; -1 when the name is in no block."""
    if not is_sdxl:
        m = _UPDOWN.search(name)
        if m:
            kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if part in ("upsamplers", "downsamplers") else j)
            return 1 + idx if kind == "down" else NUM_BLOCKS[False] + 1 + idx
        return NUM_BLOCKS[False] if "mid_block_" in name else -1
    rest = name.removeprefix("lora_unet_")
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(prefix):
            return first + int(rest[len(prefix):].split("_")[0])
    return 0 if rest.startswith(("time_embed_", "label_emb_")) else 22 if rest.startswith("out_") else -1


@dataclass
class BlockPlan:
    """Rank and alpha per block for linear/1x1 layers and for 3x3 convs (None: convs keep LoRA Config's)."""
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weights: list[float] | None

    def rank_of(self, name: str, is_sdxl: bool, conv3x3: bool, rank: int, alpha: float) -> tuple[int, float]:
        i = block_index(name, is_sdxl)
        if i < 0:
            return rank, alpha
        if conv3x3:
            return (self.conv_dims[i], self.conv_alphas[i]) if self.conv_dims is not None else (rank, alpha)
        return self.dims[i], self.alphas[i]

    @property
    def max_conv_dim(self) -> int:
        return max(self.conv_dims) if self.conv_dims else 0


def block_plan(args: dict[str, str], is_sdxl: bool, rank: int, alpha: float, conv_rank: int,
               conv_alpha: float) -> BlockPlan | None:
    """kohya's get_block_dims_and_alphas + remove_block_dims_and_alphas: None when no block key is given."""
    lr = block_lr_weights(args, is_sdxl)
    if "block_dims" not in args and lr is None:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if key in args:
                raise KilnError(f"network_args: {key} needs block_dims (or a *_lr_weight), as in kohya.")
        return None
    total = total_blocks(is_sdxl)

    def listed(key: str, kind, default):
        if key not in args:
            return default
        values = [kind(v) for v in _floats(key, args[key])]
        if len(values) != total:
            raise KilnError(f"network_args: {key} needs {total} values for {'SDXL' if is_sdxl else 'SD1/SD2'} "
                            f"(one per block), got {len(values)}.")
        return values

    dims = listed("block_dims", int, [rank] * total)
    alphas = listed("block_alphas", float, [alpha] * total)
    conv_dims = listed("conv_block_dims", int, [conv_rank] * total if conv_rank else None)
    conv_alphas = listed("conv_block_alphas", float, [conv_alpha] * total) if conv_dims is not None else None
    if lr is not None:  # a block that does not learn gets no LoRA
        for i, w in enumerate(lr):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockPlan(dims, alphas, conv_dims, conv_alphas, lr)


def loraplus_ratios(args: dict[str, str]) -> tuple[float | None, float | None]:
    """(UNet ratio, text-encoder ratio): kohya's loraplus_*_lr_ratio, each falling back to loraplus_lr_ratio."""
    def number(key):
        if key not in args:
            return None
        try:
            return float(args[key])
        except ValueError:
            raise KilnError(f"network_args: {key} must be a number, got {args[key]!r}.") from None
    common = number("loraplus_lr_ratio")
    return number("loraplus_unet_lr_ratio") or common, number("loraplus_text_encoder_lr_ratio") or common


def block_name(i: int, is_sdxl: bool) -> str:
    """Where block ``i`` is, for the verbose table (kohya's numbering, the host's part names)."""
    n, mid = NUM_BLOCKS[is_sdxl], NUM_MID[is_sdxl]
    if is_sdxl:
        if i == 0 or i == total_blocks(True) - 1:
            return "embeddings" if i == 0 else "out"
        i -= 1
        return (f"input_blocks.{i}" if i < n else f"middle_block.{i - n}" if i < n + mid
                else f"output_blocks.{i - n - mid}")
    if i < n:
        return "conv_in" if i == 0 else f"down_blocks.{(i - 1) // 3}" + (".sampler" if (i - 1) % 3 == 2 else f".{(i - 1) % 3}")
    if i < n + mid:
        return "mid_block"
    j = i - n - mid
    return f"up_blocks.{j // 3}.{j % 3}" + ("+sampler" if j % 3 == 2 and j < 11 else "")
