"""Full checkpoints (DreamBooth): written atomically, with kohya-style training metadata."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from .atomic import write_atomically


def save_checkpoint_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """A crash, Cancel or full disk leaves any earlier file at ``path`` intact and no half-written file."""
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), "the checkpoint",
                            "Free disk space or choose another name; any earlier file there is unchanged.")


def checkpoint_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
