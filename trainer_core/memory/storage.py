"""Device memory lent back for the length of a run: a weight's values go to host memory and its device storage is
freed, then refilled into the very same tensor afterwards.

ComfyUI's modules (and other nodes) keep holding the tensor object, so it is never replaced, only emptied and
refilled. Used by full fine-tuning (the original weights while trainable copies train) and block swap (the
swapped blocks' weights between their visits to the device).
"""
from __future__ import annotations

import torch


def frees_cleanly(t: torch.Tensor) -> bool:
    """Whether ``t`` alone owns its storage, so freeing that storage frees exactly this tensor."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in host memory, page-locked when CUDA is there (so copies back can run asynchronously)."""
    out = t.detach().to("cpu", copy=True)
    return out.pin_memory() if torch.cuda.is_available() else out


def free(t: torch.Tensor) -> int:
    """Release ``t``'s device storage (its values must be kept elsewhere first); returns the bytes freed."""
    nbytes = t.untyped_storage().nbytes()
    t.untyped_storage().resize_(0)
    return nbytes


def refill(t: torch.Tensor, host: torch.Tensor) -> None:
    """Give ``t`` its storage back, holding ``host``'s values (inference tensors included)."""
    t.untyped_storage().resize_(host.numel() * host.element_size())
    with torch.inference_mode(t.is_inference()), torch.no_grad():
        t.copy_(host)
