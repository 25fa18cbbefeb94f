import os

import pytest
import torch
from safetensors.torch import load_file

from trainer_core.errors import KilnError
from trainer_core.lora.io import build_metadata, load_lora_file, save_lora_file


def test_save_writes_metadata_and_hash(tmp_path):
    path = str(tmp_path / "a.safetensors")
    meta = build_metadata("stable-diffusion-v1/lora", {"network_dim": 4, "resolution": "64x64"}, "t")
    save_lora_file(path, {"x.lora_down.weight": torch.ones(2, 3)}, meta)
    sd, got = load_lora_file(path)
    assert torch.equal(sd["x.lora_down.weight"], torch.ones(2, 3))
    assert got["ss_network_dim"] == "4" and got["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert len(got["sshs_model_hash"]) == 64


def test_failed_write_midway_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "a.safetensors")
    save_lora_file(path, {"w": torch.ones(2)}, {})
    import trainer_core.lora.io as lio

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(lio, "save_file", disk_full)
    with pytest.raises(KilnError, match="No space left.*unchanged"):
        save_lora_file(path, {"w": torch.zeros(2)}, {})
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_hashes_are_the_ones_a1111_and_kohya_compute(tmp_path):
    """sshs_model_hash: sha256 of the file after its safetensors header (what A1111 and sd-webui-additional-networks
    compute from the file itself); sshs_legacy_hash: kohya's 8 hex digits of the 64 KiB at offset 1 MiB of the
    file serialised with only its ss_* metadata."""
    import hashlib

    from safetensors.torch import save

    tensors = {"x.lora_down.weight": torch.arange(512 * 1024, dtype=torch.float32).reshape(512, 1024),
               "x.alpha": torch.tensor(4.0)}
    meta = build_metadata("stable-diffusion-v1/lora", {"network_dim": 4, "v2": False}, "t")
    path = tmp_path / "h.safetensors"
    save_lora_file(str(path), tensors, meta)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    _, got = load_lora_file(str(path))
    assert got["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert got["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert got["modelspec.hash_sha256"] == "0x" + got["sshs_model_hash"]


def test_metadata_values_are_written_as_kohya_writes_them():
    meta = build_metadata("a", {"v2": False, "enable_bucket": True, "resolution": (64, 64), "learning_rate": 1e-4,
                                "network_dim": 4, "clip_skip": None, "tag_frequency": {"x": {"a": 1}},
                                "network_args": {}}, "t")
    assert meta["ss_v2"] == "False" and meta["ss_enable_bucket"] == "True"  # A1111/Forge read ss_v2 == "True"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_network_dim"] == "4" and meta["ss_clip_skip"] == "None"
    assert meta["ss_tag_frequency"] == '{"x": {"a": 1}}'
    assert "ss_network_args" not in meta  # kohya writes it only when there are network args
    assert build_metadata("a", {"network_args": {"algo": "lokr"}}, "t")["ss_network_args"] == '{"algo": "lokr"}'
