"""Saving LoRA files the way kohya writes them: safetensors, ``ss_*`` and ``modelspec.*`` metadata,
written to a temporary file and renamed, so an existing file is never left half-written."""
from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import save, save_file

from ..files.atomic import write_atomically

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainedLora:
    """What a Train node hands to Save LoRA: kohya-keyed tensors plus metadata."""
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str = ""

    def to_dtype(self, precision: str) -> dict[str, torch.Tensor]:
        dt = DTYPES[precision]
        return {k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in self.state_dict.items()}


def payload_sha256(blob: bytes) -> str:
    """sha256 of a safetensors file's bytes after its header: A1111's / sd-webui-additional-networks' hash of a
    .safetensors LoRA (``addnet_hash_safetensors``), which metadata edits do not change."""
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def model_hashes(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: of the file serialised with only its ``ss_*``
    metadata; the new hash from the payload, the legacy one (8 hex digits) from 64 KiB at offset 1 MiB."""
    blob = save(sd, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return payload_sha256(blob), hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def metadata_value(v: object) -> str:
    """One metadata value written as kohya writes it: Python's str() for scalars and tuples (``True``,
    ``0.0001``, ``(512, 512)``, ``None``), JSON for dicts and lists. A1111/Forge read ``ss_v2 == "True"``."""
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


KOHYA = "https://github.com/kohya-ss/sd-scripts"


def build_metadata(family_arch: str, base: dict[str, object], title: str, lora: bool = True,
                   implementation: str = KOHYA) -> dict[str, str]:
    """``ss_*`` training facts and ``modelspec.*`` identity (safetensors metadata is str -> str); ``lora`` False
    for a fully fine-tuned model (no ss_network_module); ``implementation``: modelspec.implementation (kohya names
    the model's own code for Flux and Chroma)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {f"ss_{k}": metadata_value(v) for k, v in base.items()
            if not (k == "network_args" and not v)}  # kohya omits empty network args
    if lora:
        meta.setdefault("ss_network_module", "networks.lora")  # base["network_module"] names another (lycoris.kohya)
    meta.update({
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family_arch,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": "x".join(map(str, res)) if isinstance(res := base.get("resolution", ""), tuple) else str(res),
    })
    return meta


def save_lora_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Atomic write: a full disk or a crash leaves any earlier file at ``path`` intact."""
    meta = dict(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
    meta["modelspec.hash_sha256"] = "0x" + meta["sshs_model_hash"]
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta), "the LoRA",
                            "Free disk space or choose another folder; any earlier file there is unchanged.")


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
