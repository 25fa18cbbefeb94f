"""LoHa, LoKr and DoRA adapters: Kiln's own modules (wrapping, naming, saving) over ``lycoris.functional``'s
maths (the maintained lycoris-lora package, Apache-2.0), with LyCORIS's key names and initialisation.

* LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank (``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·k·k), ...).
* LoKr: ΔW = kron(w1, w2) · s, out = a·b and in = c·d split by ``factorization(dim, factor)``; w1 (a, c) is
  full, w2 (b, d[·k·k]) is full (``full_matrix``, or rank ≥ max(b, d)/2, as LyCORIS decides; then s = 1)
  or ``lokr_w2_a`` (b, r) · ``lokr_w2_b`` (r, d·k·k) with s = alpha/rank.
* DoRA (LyCORIS ``dora_wd``): W' = (W + ΔW_lora) · m / ‖W + ΔW_lora‖, the norm per input column
  (``wd_on_output=False``; ``dora_scale`` (1, in[, 1, 1]) = m, initialised to ‖W‖), the convention ComfyUI's
  loader applies exactly (it takes the output-axis norm of the original weight instead of the merged one).

Forward paths (bench/algorithms.py): LoKr linears use LyCORIS's bypass (ΔW never built); LoHa linears a rank-r²
bypass through the face-splitting identity (the test checks it against the file formula); convs build ΔW.

The package is optional: only these algorithms import it, and a missing package is a KilnError naming the pip
line. The functional ops run with the ``torch`` backend (no compile warm-ups or fused kernels inside a shared
ComfyUI process); set ``KILN_LYCORIS_BACKEND`` to another lycoris backend name to try one.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import KilnError
from .modules import Adapter, LoRAModule

PIP_LINE = 'pip install "lycoris-lora>=4.1,<5"'
BACKEND = os.environ.get("KILN_LYCORIS_BACKEND", "torch")


def functional():
    """``lycoris.functional``, or a KilnError that says how to install it."""
    try:
        import lycoris.functional as lf
        from lycoris.functional import loha, lokr  # noqa: F401  (submodules the adapters use)
    except ImportError as e:
        raise KilnError(f"the LoHa / LoKr / DoRA algorithms need the lycoris-lora package: {PIP_LINE} (in ComfyUI's "
                        f"Python), then restart ComfyUI; or pick algorithm 'lora'. ({e})") from e
    return lf


class LoHaModule(Adapter):
    algorithm = "loha"
    KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, name, base, rank, alpha, module_dropout=0.0, generator=None):
        super().__init__(name, base, rank, alpha, module_dropout)
        self.lf = functional()
        out, flat_in = self.shape[0], math.prod(self.shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out, self.rank))
        self.hada_w1_b = nn.Parameter(torch.empty(self.rank, flat_in))
        self.hada_w2_a = nn.Parameter(torch.empty(out, self.rank))
        self.hada_w2_b = nn.Parameter(torch.empty(self.rank, flat_in))
        # LyCORIS's init: w2_a = 0 so training starts from the base model
        nn.init.normal_(self.hada_w1_b, std=1.0, generator=generator)
        nn.init.normal_(self.hada_w1_a, std=0.1, generator=generator)
        nn.init.normal_(self.hada_w2_b, std=1.0, generator=generator)
        nn.init.zeros_(self.hada_w2_a)

    def delta_weight(self) -> torch.Tensor:
        gamma = torch.tensor(self.scale, device=self.hada_w1_a.device)  # its autograd Function saves gamma: a tensor
        d = self.lf.loha.diff_weight(self.hada_w1_b, self.hada_w1_a, self.hada_w2_b, self.hada_w2_a, None, None,
                                     gamma=gamma, backend=BACKEND)
        return d.reshape(self.shape)

    def delta(self, x):
        if self.is_conv:
            return self.apply_weight(x, self.delta_weight())
        # linear: a bypass through the face-splitting identity (w1a·w1b) ⊙ (w2a·w2b) = (w1a • w2a)·(w1b ∘ w2b),
        # a rank-r² LoRA, never building ΔW (2-8x faster than materialising it in bench/algorithms.py)
        r = self.rank
        up = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(-1, r * r)
        down = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, -1)
        return F.linear(F.linear(x, down), up) * self.scale

    def state_items(self):
        return {**{k: getattr(self, k) for k in self.KEYS}, "alpha": torch.tensor(self.alpha)}


class LoKrModule(Adapter):
    algorithm = "lokr"

    def __init__(self, name, base, rank, alpha, module_dropout=0.0, generator=None, factor: int = -1,
                 full_matrix: bool = False):
        super().__init__(name, base, rank, alpha, module_dropout)
        self.lf = functional()
        out, inp, *k = self.shape
        a, b = self.lf.factorization(out, factor)
        c, d = self.lf.factorization(inp, factor)
        self.factors = (a, b, c, d)
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5), generator=generator)
        self.full = full_matrix or self.rank >= max(b, d) / 2  # LyCORIS's rule: a low rank there would save nothing
        if self.full:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *k))
            self.alpha = float(self.rank)  # LyCORIS: both halves full -> scale 1 (and ComfyUI ignores alpha then)
            self.lokr_w2_a = self.lokr_w2_b = None
        else:
            self.lokr_w2 = None
            self.lokr_w2_a = nn.Parameter(torch.empty(b, self.rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(self.rank, d * math.prod(k)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5), generator=generator)
        self.bypass = not self.is_conv  # linear: w1·X·w2ᵀ without building ΔW (bench/algorithms.py measured it)

    @property
    def scale(self) -> float:
        return 1.0 if self.full else self.alpha / self.rank

    def _weights(self):
        return (self.lokr_w1, None, None, self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b, None)

    def delta_weight(self) -> torch.Tensor:
        # functional.lokr scales by gamma / rank (rank read off w2_a; 1 when w2 is full)
        return self.lf.lokr.diff_weight(*self._weights(), gamma=self.alpha, backend=BACKEND).reshape(self.shape)

    def delta(self, x):
        if self.bypass:
            return self.lf.lokr.bypass_forward_diff(x, None, *self._weights(), gamma=self.alpha, backend=BACKEND)
        return self.apply_weight(x, self.delta_weight())

    def state_items(self):
        items = {"lokr_w1": self.lokr_w1, "alpha": torch.tensor(self.alpha)}
        if self.full:
            items["lokr_w2"] = self.lokr_w2
        else:
            items.update(lokr_w2_a=self.lokr_w2_a, lokr_w2_b=self.lokr_w2_b)
        return items


class DoRAModule(LoRAModule):
    """LoRA with weight decomposition. Forward without building W': W'·x = (W + ΔW)·(s ⊙ x) with
    s = m / ‖W + ΔW‖ per input channel, so the base layer's own forward (ComfyUI's casts and offloading
    included) still does the big product, and the bias is added once."""

    algorithm = "dora"

    def __init__(self, name, base, rank, alpha, dropout=0.0, rank_dropout=0.0, module_dropout=0.0, generator=None):
        super().__init__(name, base, rank, alpha, dropout, rank_dropout, module_dropout, generator)
        self.lf = functional()
        with torch.no_grad():
            w = self.base_weight()
            self.dora_scale = nn.Parameter(self.column_norm(w))

    def base_weight(self, device=None) -> torch.Tensor:
        return self.base.weight.detach().to(device or self.base.weight.device, torch.float32)

    def column_norm(self, w: torch.Tensor) -> torch.Tensor:
        """‖W‖ over everything but the input channel: shape (1, in) or (1, in, 1, 1), LyCORIS's wd_on_out=False."""
        n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        return n.reshape(1, -1, *[1] * (w.dim() - 2))

    def input_scale(self, device) -> torch.Tensor:
        v = self.base_weight(device) + self.low_rank_weight().float()
        return self.dora_scale / (self.column_norm(v) + torch.finfo(torch.float32).eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skipped():
            return self._base_forward(x)
        s = self.input_scale(x.device)
        xs = (x * (s.reshape(-1) if not self.is_conv else s)).to(x.dtype)
        out = self._base_forward(xs)
        return out + self.delta(self.compute_input(xs)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        w = self.base_weight(self.dora_scale.device)
        merged = self.lf.weight_decompose(w + self.low_rank_weight(), self.dora_scale, 1, wd_on_out=False,
                                          backend=BACKEND)
        return merged - w

    def state_items(self):
        return {**super().state_items(), "dora_scale": self.dora_scale}
