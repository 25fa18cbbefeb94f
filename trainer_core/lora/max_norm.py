"""kohya's ``scale_weight_norms``: max-norm regularisation of LoRA modules. After every optimizer step, a module
whose weight change ΔW = up·down·α/r has a Frobenius norm above the limit is scaled back to it, half of the
factor on each of up and down (√ratio each), so ΔW shrinks by the ratio and neither factor dominates. As in kohya,
the norm is first clamped from below at half the limit, which changes nothing below the limit."""
from __future__ import annotations

import torch

from ..errors import KilnError
from .modules import LoRAModule


def check(network, max_norm: float) -> None:
    """Refuse, before the first step, a network max-norm cannot regularise: it acts on up/down pairs."""
    if not network.switchable:  # no adapters: every weight of the model trains itself
        raise KilnError(f"scale_weight_norms={max_norm:g} regularises LoRA modules (their up·down products); a full "
                        f"fine-tune (DreamBooth) has none: remove it.")
    other = sorted({a.algorithm for a in network.adapters.values() if not isinstance(a, LoRAModule)})
    if other:
        raise KilnError(f"scale_weight_norms={max_norm:g} scales LoRA/DoRA up and down matrices; {'/'.join(other)} "
                        f"adapters have none (kohya applies it to networks.lora only): remove it or use LoRA.")


@torch.no_grad()
def apply(network, max_norm: float) -> tuple[int, float, float]:
    """Scale every module over ``max_norm`` back to it; (modules scaled, mean norm, largest norm) after scaling,
    the figures kohya logs."""
    scaled, norms = 0, []
    for a in network.adapters.values():
        actual = a.low_rank_weight().norm()
        norm = actual.clamp(min=max_norm / 2)
        ratio = norm.clamp(max=max_norm) / norm
        if ratio != 1:
            scaled += 1
            root = ratio.sqrt()
            a.lora_up.weight.mul_(root.to(a.lora_up.weight.dtype))
            a.lora_down.weight.mul_(root.to(a.lora_down.weight.dtype))
        norms.append(float(actual * ratio))
    return scaled, sum(norms) / max(1, len(norms)), max(norms, default=0.0)
