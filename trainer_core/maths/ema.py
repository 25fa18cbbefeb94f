"""An exponential moving average (EMA) of the trained tensors: what Save LoRA, the previews and the output MODEL
use when ``ema_decay`` is on. Averaging the last few hundred steps smooths the step-to-step noise of a small batch,
which is why OneTrainer, SimpleTuner and ai-toolkit offer it (kohya's sd-scripts#1321 / #2009 were not merged).

After every ``update_every``-th optimizer step: ``shadow ← d·shadow + (1 − d)·weight``, with ``d = decay``, or with
warm-up ``d = min(decay, (1 + n) / (10 + n))`` for the n-th update, so the first updates follow the weights
closely instead of holding on to the untrained start (the warm-up of diffusers' EMAModel and timm's ModelEmaV2).
The shadow is float32, on the weights' device or on the host (``on_host``) to spare device memory.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, params: list[torch.Tensor], decay: float, update_every: int = 1, warmup: bool = True,
                 on_host: bool = False):
        self.params = params
        self.decay, self.update_every, self.warmup = decay, update_every, warmup
        self.shadow = [p.detach().to("cpu" if on_host else p.device, torch.float32, copy=True) for p in params]
        self.updates = 0

    def decay_now(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        if step % self.update_every:
            return
        weight = 1.0 - self.decay_now()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.device, torch.float32), weight)
        self.updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for s, p in zip(self.shadow, self.params):  # one tensor at a time: no second copy of the whole model
            trained = p.detach().clone()
            p.copy_(s)
            s.copy_(trained)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged values in the trained tensors for the duration (a preview, an intermediate save); the
        trained values come back bit-identically."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """End of training: the averaged values become the result."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": [s.detach().to("cpu", copy=True) for s in self.shadow], "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
        self.updates = state["updates"]
