"""A private, non-dynamic copy of a MODEL/CLIP/VAE patcher to compute with when the shared one cannot be used
(ComfyUI's dynamic VRAM, see compat.py), or a KilnError saying what to do instead."""
from __future__ import annotations

import logging

from ...trainer_core.errors import KilnError
from . import compat

log = logging.getLogger("kiln")

DYNAMIC = "ComfyUI streams its weights to the GPU through shared buffers (dynamic VRAM)"


def private_patcher(patcher, what: str, node: str, why: str = DYNAMIC, also: str = ""):
    """(copy patcher, note for the node's output text). ``what`` names the object (MODEL, CLIP, VAE); ``also`` is
    one more way out for the error, e.g. "set the text-encoder learning rates to 0, "."""
    try:
        copy = compat.private_copy(patcher)
    except RuntimeError as e:
        raise KilnError(f"{node}: this {what} cannot be used in place ({why}) and {e}. Load it with a core loader "
                        f"node (Load Checkpoint, Load Diffusion Model, Load CLIP, Load VAE), {also}or start "
                        f"ComfyUI with --disable-dynamic-vram.") from None
    note = copy.describe(what, why)
    log.info("kiln: %s: %s", node, note)
    return copy.patcher, note
