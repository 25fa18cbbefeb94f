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
