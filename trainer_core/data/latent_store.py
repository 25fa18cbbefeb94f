"""Where encoded latents are kept between runs: content-addressed entries in memory and on disk.

An entry is one VAE latent (plus its latent-size mask) of one image under one geometry. Its key is a
hash of everything the tensors depend on: the image file's bytes, the mask's bytes (or which mask
mode produced no file: "none", "alpha", "missing → white"), the resize/crop/flip geometry and the VAE's
identity. Paths and timestamps are deliberately not in the key: a renamed file reuses its entry, an
edited one (same name, same mtime or not) never does; switching masks on or off changes the key, so a
latent cached without a mask can never be served where a mask is wanted (kohya's stale-cache bug).

On disk an entry is a ``<key>.safetensors`` file written atomically (temp file + ``os.replace``), so a
crash or a parallel run never leaves a half-written entry under a real key; a file that is damaged
anyway is reported by name and encoded again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .transforms import Geometry
from ..files.atomic import write_atomically
from ..errors import KilnError

log = logging.getLogger("kiln")

# Bump when anything that changes the pixels fed to the VAE changes (resampling, colour conversion, ...):
# old entries then simply stop matching.
FORMAT = "kiln-latent-v1"


@dataclass(frozen=True)
class Entry:
    latent: torch.Tensor             # [C, h, w] float32 CPU, exactly what the VAE returned
    mask: torch.Tensor | None        # [1, h, w] in [0, 1], area-averaged to latent size, not dilated

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latent, self.mask) if t is not None)


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (what the cache trusts instead of names or timestamps)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise KilnError(f"cannot read {path}: {e.strerror or e}") from e
    return h.hexdigest()


def entry_key(image_digest: str, mask_token: str, geometry: Geometry, encoder_id: str) -> str:
    """The cache key of one latent; ``mask_token`` says where the mask came from (see module doc)."""
    payload = json.dumps({"format": FORMAT, "image": image_digest, "mask": mask_token,
                          "geometry": asdict(geometry), "encoder": encoder_id}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class MemoryStore:
    """Entries kept in this process (least recently used dropped beyond ``max_bytes``), so re-running
    Cache Latents with another batch size, dilation or a grown dataset encodes only what is new."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self.entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class DiskStore:
    """One safetensors file per entry in ``folder`` (created if needed). Safe to delete at any time."""

    def __init__(self, folder: str, redo: str = "encoding its image again"):
        self.folder = folder
        self.redo = redo  # what happens instead, said when an entry is unreadable
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise KilnError(f"cannot create the latent cache folder {folder}: {e.strerror or e}. Choose another "
                            f"cache folder, or turn the disk cache off.") from e

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".safetensors")

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or None when absent or unreadable (then a warning names the file)."""
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("kiln_key") != key:
                    raise ValueError("its recorded key does not match its file name")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
            if bad:
                raise ValueError(f"{bad[0]} holds NaN or inf")
        except Exception as e:  # safetensors raises its own error types for truncated / garbled files
            log.warning("kiln: cache file %s is unreadable (%s); %s", path, e, self.redo)
            return None
        return tensors

    def write(self, key: str, tensors: dict[str, torch.Tensor], source: str = "", fmt: str = FORMAT) -> None:
        tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        meta = {"kiln_key": key, "kiln_format": fmt, "source": source}
        write_atomically(self.path(key), lambda tmp: save_file(tensors, tmp, metadata=meta), "the cache file",
                         "Free disk space, choose another cache folder, or turn the disk cache off.")

    def get(self, key: str) -> Entry | None:
        """The stored latent entry, or None when absent or unreadable (then a warning names the file)."""
        tensors = self.read(key)
        if tensors is None:
            return None
        latent, mask = tensors.get("latent"), tensors.get("mask")
        problem = None
        if latent is None:
            problem = "no latent in it"
        elif latent.dim() != 3:
            problem = f"bad latent {tuple(latent.shape)}"
        elif mask is not None and (mask.dim() != 3 or mask.shape[-2:] != latent.shape[-2:]):
            problem = f"mask {tuple(mask.shape)} does not fit latent {tuple(latent.shape)}"
        if problem:
            log.warning("kiln: cache file %s is unreadable (%s); %s", self.path(key), problem, self.redo)
            return None
        return Entry(latent.float(), None if mask is None else mask.float())

    def put(self, key: str, entry: Entry, source: str = "") -> None:
        tensors = {"latent": entry.latent}
        if entry.mask is not None:
            tensors["mask"] = entry.mask
        self.write(key, tensors, source)

