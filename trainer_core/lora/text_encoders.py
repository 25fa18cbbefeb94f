"""Text-encoder LoRA: which layers (kohya's CLIPAttention/CLIPMLP and T5 attention/FF linears) and their names.

Paths are those of the host's text-encoder module (ComfyUI's ``cond_stage_model``): ``clip_l.transformer.
text_model.encoder.layers.0.self_attn.q_proj``, ``t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q``.
The kohya name is the family's prefix for that encoder plus the path inside ``transformer`` with dots as
underscores, e.g. ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj`` (HF module names, as kohya saves).
"""
from __future__ import annotations

import re

from .targets import TargetRule

_LAYERS = {
    "clip": r"transformer\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
    "t5": r"transformer\.encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.(q|k|v|o)|DenseReluDense\.(wi|wi_0|wi_1|wo))",
}


def te_rules(encoders: list[str], rank: int, alpha: float, last_layer: dict[str, int] | None = None) -> list[TargetRule]:
    """Rules for the named encoders (``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``) at one rank. ``last_layer``
    limits an encoder to layers 0..k: the later ones never reach the output under clip skip (kohya's SD2 text
    encoder has no last layer at all), so a LoRA there could never change anything."""
    rules = []
    for e in encoders:
        pattern = _LAYERS['t5' if e.startswith('t5') else 'clip']
        k = (last_layer or {}).get(e)
        if k is not None:
            pattern = pattern.replace(r"layers\.\d+", "layers\\.(" + "|".join(str(i) for i in range(k + 1)) + ")")
        rules.append(TargetRule(rf"{re.escape(e)}\.{pattern}", ("linear",), rank, alpha))
    return rules


def te_namer(prefixes: dict[str, str]):
    """``prefixes`` maps encoder -> kohya prefix, e.g. {"clip_l": "lora_te"} (SD1) or
    {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5xxl": "lora_te3"} (SD3)."""
    def name(path: str) -> str:
        encoder, rest = path.split(".", 1)
        return f"{prefixes[encoder]}_{rest.removeprefix('transformer.').replace('.', '_')}"
    return name
