"""Data-parallel training over processes that torchrun (or ``accelerate launch``, which runs torchrun's launcher)
started: rank, world size, barrier, one global batch split across ranks, averaged gradients. Every helper is a
no-op in a plain single process, so the loop reads the same either way.

Gradients are synchronised by an explicit all-reduce, not by DistributedDataParallel: the trainable parameters are
adapters attached to a host network that the host (ComfyUI) owns and other graph nodes share, so there is no
module of ours to wrap, and DDP's hooks would also see the frozen host. LoRA parameters are small, so one flattened
all-reduce per optimizer step (after gradient accumulation, DDP's ``no_sync`` for free) costs one round trip; a
full fine-tune's gradients go in buckets of ``BUCKET`` values so no second copy of all of them is ever made.

The launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) is the
rendezvous: the same code runs on one machine and across nodes (``--nnodes``)."""
from __future__ import annotations

import datetime
import os

import torch

# the class_types (a public API) of the Train nodes: a multi-process run shares out exactly one of them
TRAINERS = ("KilnTrainSD1", "KilnTrainSDXL", "KilnTrainSD3", "KilnTrainDreamBooth")
BUCKET = 1 << 24  # values per all-reduce when the gradients are large (64 MiB in fp32)
# how long a rank waits for the others at a collective: ranks drift apart by whole nodes (rank 0 alone samples
# previews; a node-local latent cache makes every rank encode what it misses), so NCCL's 10-minute default is short
TIMEOUT = datetime.timedelta(hours=1)


def launched() -> bool:
    """True in a process that torchrun / accelerate launch started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's index on its own machine: the device it binds."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Only rank 0 writes files, samples previews and prints."""
    return rank() == 0


def visible_device(env: dict | None = None) -> str:
    """The CUDA_VISIBLE_DEVICES value that leaves this process only its own GPU: entry LOCAL_RANK of the list the
    launcher was given (or GPU number LOCAL_RANK when none was). Set before torch first touches CUDA, so the
    host (ComfyUI) sees one device, cuda:0, and places everything on it."""
    env = os.environ if env is None else env
    given = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    lr = int(env.get("LOCAL_RANK", "0"))
    if given and lr >= len(given):
        raise RuntimeError(f"LOCAL_RANK {lr} but CUDA_VISIBLE_DEVICES lists only {len(given)} device(s) "
                           f"({env['CUDA_VISIBLE_DEVICES']}): start at most {len(given)} processes per node.")
    return given[lr] if given else str(lr)


def init(device: torch.device) -> str:
    """Join the process group the launcher set up: NCCL between GPUs, gloo on the CPU. Returns the backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    return backend


def shutdown() -> None:
    if active():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def share(n: int, r: int | None = None, w: int | None = None) -> slice:
    """Rank r's part of a global batch of n samples: contiguous, ⌈n/w⌉ each, so a full batch of B·w gives every
    rank B, and a short last batch leaves the last ranks fewer (possibly none)."""
    r, w = rank() if r is None else r, world() if w is None else w
    k = -(-n // w)
    return slice(min(n, r * k), min(n, (r + 1) * k))


def broadcast_(params: list[torch.Tensor]) -> None:
    """Every rank starts from rank 0's values (the seeded init is the same anyway; this makes it certain)."""
    if not active():
        return
    with torch.no_grad():
        for chunk in _buckets(params):
            flat = torch.cat([p.detach().reshape(-1) for p in chunk])
            torch.distributed.broadcast(flat, 0)
            _scatter(flat, chunk, lambda p, v: p.copy_(v))


def average_gradients(params: list[torch.Tensor], loss: float) -> float:
    """Average the gradients of ``params`` over the ranks, and ``loss`` with them (the logged loss is the mean
    over ranks). A rank whose share of a batch was empty adds zeros; a parameter no rank gave a gradient keeps
    ``None`` (the optimizer then skips it, as a single process would)."""
    if not active():
        return loss
    w = world()
    live = [p for p in params if p.requires_grad]
    device = live[0].device if live else torch.device("cpu")
    head = torch.tensor([loss] + [float(p.grad is not None) for p in live], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(head)
    has_grad = [bool(h > 0) for h in head[1:].tolist()]
    live = [p for p, h in zip(live, has_grad) if h]
    for chunk in _buckets(live):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in chunk])
        torch.distributed.all_reduce(flat)
        flat /= w

        def put(p, v):
            if p.grad is None:
                p.grad = v.to(p.dtype).clone()
            else:
                p.grad.copy_(v)
        _scatter(flat, chunk, put)
    return float(head[0]) / w


def _buckets(params: list[torch.Tensor]):
    chunk, size = [], 0
    for p in params:
        if chunk and size + p.numel() > BUCKET:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk


def _scatter(flat: torch.Tensor, params: list[torch.Tensor], put) -> None:
    at = 0
    for p in params:
        put(p, flat[at:at + p.numel()].view_as(p))
        at += p.numel()


def split_torch_rng() -> None:
    """Ranks > 0 move torch's global RNG (dropout masks) to a stream of their own, derived from its current state,
    so no two ranks drop the same units; rank 0 keeps the stream a single process would use."""
    r = rank()
    if r:
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,))) + r)
