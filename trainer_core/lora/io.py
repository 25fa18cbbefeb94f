"""Saving LoRA files the way kohya writes them: safetensors, ``ss_*`` and ``modelspec.*`` metadata,
written to a temporary file and renamed, so an existing file is never left half-written."""
from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import save, save_file

from ..atomic import write_atomically

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


def model_hash(sd: dict[str, torch.Tensor]) -> str:
    """kohya's sshs_model_hash: sha256 of the tensor payload (metadata excluded)."""
    return hashlib.sha256(save(sd)).hexdigest()


def build_metadata(family_arch: str, base: dict[str, object], title: str) -> dict[str, str]:
    """``ss_*`` training facts and ``modelspec.*`` identity (safetensors metadata is str -> str)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {f"ss_{k}": (v if isinstance(v, str) else json.dumps(v)) for k, v in base.items()}
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family_arch,
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": str(base.get("resolution", "")),
    })
    return meta


def save_lora_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Atomic write: a full disk or a crash leaves any earlier file at ``path`` intact."""
    meta = dict(metadata)
    meta["sshs_model_hash"] = model_hash(tensors)
    meta["modelspec.hash_sha256"] = "0x" + meta["sshs_model_hash"]
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta), "the LoRA",
                            "Free disk space or choose another folder; any earlier file there is unchanged.")


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
