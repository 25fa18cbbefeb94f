"""Differences between the ComfyUI versions Kiln runs on (0.3.75 … 0.33). Nothing else in Kiln asks which
ComfyUI it runs in; it asks this module. No relative imports: cli.py loads this file before the pack.

What changed (docs/architecture.md, fact 9):
  * dynamic VRAM (≥ 0.16, NVIDIA only): the loaded MODEL/CLIP/VAE is a ModelPatcherDynamic whose weights are
    cast to the GPU layer by layer through reused buffers. Autograd would save views of those buffers, which the
    next layer overwrites: silently wrong gradients. Kiln trains through a classic patcher instead, the
    "non-dynamic delegate" ComfyUI itself builds for the same reason (its samplers use it for hooked conds):
    the model re-created by its own loader, fully loaded on the GPU while training (so the dynamic model's
    staged weights are evicted, never two copies on the GPU), its host copy kept by ComfyUI on the input
    patcher for the next run;
  * the prompt executor's cache arguments (``--cache-ram`` became a list; RAM pressure is the default);
  * ``PromptServer.instance.node_replace_manager`` (0.33), which node packs register with at import;
  * V3 inputs' ``advanced`` flag (the frontend hides such inputs until "Show Advanced"): an argument of every input
    in 0.33, absent from 0.3.75's API, where the same key goes to the frontend through the input's extra keys;
  * ``comfy.model_management.in_training`` (≥ 0.14): True switches Flux's RoPE (comfy-kitchen's fused kernel in
    0.33), Lumina's fused norm+RoPE, LTX and others to backward-safe code; 0.3.75 has no such flag (its code is
    backward-safe as it is);
  * who assembles a full checkpoint: the model (0.3.x, ``get_sd`` of the CLIP) or the MODEL patcher (0.33, with
    the unet's state dict passed in and the CLIP's ``state_dict_for_saving``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psutil


def is_dynamic(patcher) -> bool:
    """Whether a ModelPatcher stages its weights per layer (ComfyUI's dynamic VRAM)."""
    probe = getattr(patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


@contextlib.contextmanager
def in_training():
    """ComfyUI's ``in_training`` flag set while a run trains and put back as it was afterwards (also on an error
    or Cancel); nothing where this ComfyUI has no such flag."""
    import comfy.model_management as mm
    if not hasattr(mm, "in_training"):
        yield False
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield True
    finally:
        mm.in_training = before


@dataclass
class PrivateCopy:
    patcher: object     # a classic ModelPatcher over weights nobody else computes with through buffers
    seconds: float      # time to get it (a reload from disk the first time; cached by ComfyUI afterwards)
    host_bytes: int     # process RSS growth while getting it
    size_bytes: int     # the model's weight bytes
    kept: bool          # ComfyUI keeps it on the input patcher for the next run (the dynamic delegate)

    def describe(self, what: str, why: str) -> str:
        gib = 1024 ** 3
        life = ("ComfyUI keeps it for the next run, the GPU never holds two copies" if self.kept
                else "freed after the run")
        return (f"{what}: {why}, so Kiln computes with a non-dynamic copy re-loaded by ComfyUI's own loader "
                f"({self.size_bytes / gib:.2f} GiB of weights; took {self.seconds:.1f} s and "
                f"+{max(self.host_bytes, 0) / gib:.2f} GiB host RAM; {life})")


def private_copy(patcher) -> PrivateCopy:
    """A classic (non-dynamic) patcher of the same weights and patches, re-created by the loader that made
    ``patcher``: ComfyUI's own cached non-dynamic delegate for a dynamic patcher, a fresh load (ComfyUI's
    ``clone(force_deepcopy=True)``) otherwise. Raises RuntimeError when ComfyUI does not know how the model was
    loaded (``cached_patcher_init`` unset: a custom loader) or is too old to re-load it."""
    rss, t0 = psutil.Process().memory_info().rss, time.perf_counter()
    kept = is_dynamic(patcher)
    if kept:
        copy = patcher.get_non_dynamic_delegate()
    elif getattr(patcher, "cached_patcher_init", None) is not None:
        copy = patcher.clone(force_deepcopy=True)
    else:
        raise RuntimeError("ComfyUI cannot re-load this model (it records no loader for it)")
    return PrivateCopy(copy, time.perf_counter() - t0, psutil.Process().memory_info().rss - rss, copy.model_size(),
                       kept)


def checkpoint_tensors(patcher, clip, vae_sd: dict) -> dict:
    """A full checkpoint's tensors assembled by ComfyUI's own code, as its Save Checkpoint node does: newer
    versions ask the MODEL patcher (which also reads weights that are streamed or not patched in yet) with the
    CLIP's ``state_dict_for_saving``; older ones ask the model itself with the CLIP's ``get_sd``."""
    if hasattr(patcher, "state_dict_for_saving"):
        return patcher.state_dict_for_saving(clip.state_dict_for_saving(), vae_sd)
    return patcher.model.state_dict_for_saving(clip.get_sd(), vae_sd)


def executor_cache(args) -> tuple[object, dict]:
    """(cache_type, cache_args) for ``execution.PromptExecutor``, chosen from ComfyUI's own command-line
    arguments the way its main.py chooses them."""
    import execution

    types = execution.CacheType
    if isinstance(args.cache_ram, (list, tuple)):  # ≥ 0.2x: RAM-pressure caching by default, two thresholds
        import comfy.model_management as mm
        ram, inactive = 0.0, 0.0
        if not args.cache_classic and not args.cache_none and args.cache_lru <= 0:
            ram = min(10.0, max(2.0, mm.total_ram * 0.10 / 1024.0))
            inactive = min(128.0, mm.total_ram / 1024.0)
            ram = args.cache_ram[0] if len(args.cache_ram) > 0 else ram
            inactive = args.cache_ram[1] if len(args.cache_ram) > 1 else inactive
        kind = (types.CLASSIC if args.cache_classic else types.LRU if args.cache_lru > 0
                else types.NONE if args.cache_none else types.RAM_PRESSURE)
        return kind, {"lru": args.cache_lru, "ram": ram, "ram_inactive": inactive}
    kind = (types.LRU if args.cache_lru > 0 else types.RAM_PRESSURE if args.cache_ram > 0
            else types.NONE if args.cache_none else types.CLASSIC)
    return kind, {"lru": args.cache_lru, "ram": args.cache_ram}


def mark_advanced(spec):
    """Make a V3 input an advanced one (hidden by the frontend until the node's "Show Advanced"); returns it."""
    if hasattr(spec, "advanced"):
        spec.advanced = True
    else:
        spec.extra_dict["advanced"] = True
    return spec


def node_replace_manager():
    """ComfyUI's own NodeReplaceManager for a stand-in server (node packs register replacements with it at
    import), or None on versions without one."""
    try:
        from app.node_replace_manager import NodeReplaceManager
    except ImportError:
        return None
    return NodeReplaceManager()


def apply_node_replacements(manager, prompt: dict) -> None:
    """What the server does to a posted prompt before validating it (renamed/replaced node types)."""
    if manager is not None and hasattr(manager, "apply_replacements"):
        manager.apply_replacements(prompt)
