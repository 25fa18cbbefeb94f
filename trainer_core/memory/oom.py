"""Out of memory during training: stop with what to change, with the figures, instead of a CUDA traceback.

The training loop and the Train nodes' previews run inside ``oom_guard``. torch raises ``torch.OutOfMemoryError``
(``torch.cuda.OutOfMemoryError`` is the same class) for device allocations; it becomes a KilnError naming where
it happened, the device's free/total memory and the size of what trains, and the settings that lower the peak,
in the order they usually help. The host's cleanup (adapters detached, weights restored, the last intermediate
save kept) runs on the way out as for any other error.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

import torch

from ..errors import KilnError

GIB = 2 ** 30


def memory_figures(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_allocated(device)
        return f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB on {device}, peak {peak / GIB:.1f} GiB allocated by torch"
    return f"on {device}"


def advice(cfg, trained_params: int, device: torch.device) -> list[str]:
    """What lowers the peak, from the run's own settings: only changes that apply to this run."""
    tips = []
    if cfg.batch_size > 1:
        tips.append(f"a smaller batch_size (now {cfg.batch_size}; raise grad_accum to keep the effective batch)")
    if not cfg.memory.gradient_checkpointing:
        tips.append("gradient_checkpointing on (recomputes activations in backward: the largest saving)")
    if cfg.precision in ("fp32", "auto") and device.type == "cuda":
        tips.append("precision bf16 (or fp16 on GPUs without bf16)")
    if not cfg.optim.fused_backward_pass and cfg.grad_accum == 1:
        tips.append("fused_backward_pass=true in training_args (gradients are freed as each weight steps)")
    if "8bit" not in cfg.optimizer_name.lower():
        tips.append("optimizer AdamW8bit (optimizer state in 8 bits)")
    if cfg.ema.ema_decay and not cfg.ema.ema_on_host:
        tips.append(f"ema_on_host=true (the EMA holds {trained_params * 4 / GIB:.2f} GiB on the device)")
    tips.append("a lower resolution or max_bucket_reso on Load Dataset (activations grow with the pixel count)")
    tips.append("fewer trained layers or a lower rank (LoRA Config), or no text-encoder training")
    return tips


@contextlib.contextmanager
def oom_guard(cfg, trained_params: int, device: torch.device, where: str | Callable[[], str]) -> Iterator[None]:
    """``where``: e.g. "at training step 12" (a callable is asked when the error happens)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        figures = memory_figures(device)  # before the cache is emptied: what the run had
        gc.collect()
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        tips = "; ".join(advice(cfg, trained_params, device))
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        raise KilnError(f"out of memory {where() if callable(where) else where} ({figures}; {trained_params / 1e6:.1f}M trained weights, batch "
                        f"{cfg.batch_size}, precision {cfg.precision}): {first}. To fit, try: {tips}.") from None
