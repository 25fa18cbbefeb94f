"""Training-state files beside intermediate LoRAs and checkpoints: what ``loop.train`` needs to resume a run exactly.

``<file>.kiln-state`` (an extension ComfyUI's model lists ignore) holds the optimizer, schedule, every RNG and
the batch position, plus a signature of the run (seed, dataset size, batch size, steps) so a state is only
reused for the run it belongs to. Written atomically; read with ``weights_only=True`` (no code in the file).
"""
from __future__ import annotations

import os

import torch

from .atomic import write_atomically

SUFFIX = ".kiln-state"


def state_path(path: str) -> str:
    return os.path.splitext(path)[0] + SUFFIX


def save_state(path: str, state: dict, signature: dict) -> str:
    return write_atomically(state_path(path), lambda tmp: torch.save({"signature": signature, "state": state}, tmp),
                            "the training state", "Free disk space, or set save_every_n_steps to 0.")


def load_state(path: str, signature: dict) -> tuple[dict | None, str]:
    """(state, note): the saved state when it exists and belongs to a run like this one, else None and why."""
    path = state_path(path)
    if not os.path.isfile(path):
        return None, (f"no {os.path.basename(path)} beside it: continuing from its weights, with a fresh optimizer "
                      f"and schedule")
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        return None, f"{os.path.basename(path)} is unreadable ({e}): continuing from its weights only"
    differs = [k for k in signature if saved.get("signature", {}).get(k) != signature[k]]
    if differs:
        was = saved.get("signature", {})
        detail = ", ".join(f"{k} {was.get(k)!r} → {signature[k]!r}" for k in differs)
        return None, f"the saved run differs ({detail}): continuing from its weights only"
    return saved["state"], f"its {SUFFIX} holds the run's state at step {saved['state']['step']}"
