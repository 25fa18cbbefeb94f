"""Block swap (kohya's ``blocks_to_swap``): the weights of the network's last N blocks live in host memory and
visit the device only while their block computes.

A swapped block's parameters and buffers keep their tensor objects (the modules and autograd hold them); only
what they point at changes. Out, each holds an empty placeholder, so a use out of turn fails loudly instead of
computing with stale values; in, it holds a device copy of its host values. A block comes in

* just before its forward (a forward pre-hook) and goes out right after it, and
* when the gradient of its output arrives (a hook on its output tensors), that is, before its own backward and
  before a gradient-checkpointing recompute, which runs inside that backward. It goes out when the backward has
  reached an earlier block: autograd runs a later block's nodes before an earlier one's (by creation order), so
  by then nothing of it is pending.

The frozen base weights get no gradient, so nothing is ever copied back: out is just dropping the device copy.
Transfers run on a side CUDA stream, and the next block in the pass's order is fetched while the current one
computes. On the CPU the same hooks run in the same order with plain copies, which is what the correctness test
compares against no swap.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import storage
from ..errors import KilnError


class _Entry:
    """One swapped tensor: the object the module holds, its host values, and its device storage while parked."""

    def __init__(self, t: torch.Tensor, device: torch.device):
        self.tensor = t
        self.host = storage.host_copy(t)
        self.original = t.detach()  # a view of the storage the run started with, refilled at the end
        self.freed = 0
        if t.device.type != "cpu" and storage.frees_cleanly(t):
            self.freed = storage.free(self.original)
        self.placeholder = torch.empty(0, dtype=t.dtype, device=device)
        t.data = self.placeholder


class BlockSwap:
    """Swaps ``blocks[-count:]`` between host memory and ``device`` around their forward and backward."""

    def __init__(self, blocks: list[nn.Module], count: int, device: torch.device):
        if count < 0 or count > len(blocks):
            raise KilnError(f"blocks_to_swap={count}: this model has {len(blocks)} blocks; use 0 to {len(blocks)}.")
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.swapped = list(range(len(blocks) - count, len(blocks)))
        self.entries: dict[int, list[_Entry]] = {}
        self.resident: set[int] = set()
        self.pending: dict[int, tuple] = {}  # block -> (its device copies, the CUDA event of their transfer or None)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.transfers = 0
        self.handles = []

    @property
    def freed_bytes(self) -> int:
        return sum(e.freed for entries in self.entries.values() for e in entries)

    # --- moving a block ----------------------------------------------------------------------------------

    def _fetch(self, i: int) -> None:
        """Start bringing block i in (asynchronously on CUDA)."""
        if i in self.resident or i in self.pending:
            return
        stream = torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()
        with stream, torch.no_grad():
            copies = [e.host.to(self.device, non_blocking=True, copy=True) for e in self.entries[i]]
        event = None
        if self.stream:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (copies, event)
        self.transfers += 1

    def _bring_in(self, i: int) -> None:
        self._fetch(i)
        if i in self.pending:
            copies, event = self.pending.pop(i)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            for e, c in zip(self.entries[i], copies):
                if self.stream:
                    c.record_stream(torch.cuda.current_stream(self.device))
                e.tensor.data = c
            self.resident.add(i)

    def _send_out(self, i: int) -> None:
        if i in self.resident:
            for e in self.entries[i]:
                e.tensor.data = e.placeholder
            self.resident.discard(i)

    def _neighbour(self, i: int, step: int) -> int | None:
        k = self.swapped.index(i) + step
        return self.swapped[k] if 0 <= k < len(self.swapped) else None

    # --- the hooks ---------------------------------------------------------------------------------------

    def _before_forward(self, i: int) -> None:
        for j in list(self.resident):
            if j != i:
                self._send_out(j)
        self._bring_in(i)
        nxt = self._neighbour(i, +1)
        if nxt is not None:
            self._fetch(nxt)

    def _before_backward(self, i: int) -> None:
        for j in list(self.resident):
            if j > i:
                self._send_out(j)
        self._bring_in(i)
        prev = self._neighbour(i, -1)
        if prev is not None:
            self._fetch(prev)

    def _after_forward(self, i: int, output) -> None:
        if torch.is_grad_enabled():
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, i=i: self._before_backward(i) or grad)
        self._send_out(i)

    # --- attach / detach ---------------------------------------------------------------------------------

    def attach(self) -> "BlockSwap":
        for i in self.swapped:
            block = self.blocks[i]
            tensors = [t for m in block.modules() for store in (m._parameters, m._buffers)
                       for t in store.values() if t is not None]
            self.entries[i] = [_Entry(t, self.device) for t in dict.fromkeys(tensors)]
            self.handles.append(block.register_forward_pre_hook(lambda mod, args, i=i: self._before_forward(i)))
            self.handles.append(block.register_forward_hook(lambda mod, args, out, i=i: self._after_forward(i, out)))
        return self

    def detach(self) -> None:
        """Hooks off; every swapped tensor points at its original storage again, refilled where it was freed."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()
        if self.stream:
            self.stream.synchronize()
        for entries in self.entries.values():
            for e in entries:
                if e.freed:
                    storage.refill(e.original, e.host)
                e.tensor.data = e.original
        self.entries.clear()
        self.resident.clear()


@contextlib.contextmanager
def block_swap(blocks: list[nn.Module], count: int, device: torch.device):
    """``BlockSwap`` for the duration (nothing when ``count`` is 0)."""
    if not count:
        yield None
        return
    swap = BlockSwap(blocks, count, device).attach()
    try:
        yield swap
    finally:
        swap.detach()
