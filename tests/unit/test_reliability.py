"""Reliability of what Kiln reads and writes (issue 17): file permissions, failed and interrupted writes, caption
encodings, 16-bit images, black masks, and LoRAs of another rank. The tests that mount a filesystem or start a
process are tests/system/test_filesystems.py."""
import errno
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from fixtures.datasets import make_dataset
from trainer_core.files.atomic import write_atomically
from trainer_core.data.cache import encode_dataset
from trainer_core.data.buckets import BucketConfig
from trainer_core.data.captions import read_caption
from trainer_core.data.dataset import build_dataset, subsets_from_folder
from trainer_core.data.images import open_image
from trainer_core.errors import KilnError
from trainer_core.data.latent_store import DiskStore
from trainer_core.lora.io import save_lora_file
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.maths.losses import per_sample_loss

TENSORS = {"a.lora_down.weight": torch.ones(2, 8), "a.lora_up.weight": torch.zeros(8, 2), "a.alpha": torch.tensor(2.0)}


# --- permissions (item 6) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_umask_permissions_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        lora = save_lora_file(str(tmp_path / "l.safetensors"), TENSORS, {})
        DiskStore(str(tmp_path / "cache")).write("k" * 64, {"latent": torch.zeros(4, 2, 2)})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    assert want == 0o666 & ~umask
    assert os.stat(lora).st_mode & 0o777 == want
    assert os.stat(tmp_path / "cache" / ("k" * 64 + ".safetensors")).st_mode & 0o777 == want


# --- failed writes (item 10): target named, free space said, no temp file, earlier file untouched ---------

def _fails_half_way(exc):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise exc
    return write


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EROFS, "Read-only file system"),
                                 RuntimeError("safetensors: No space left on device (os error 28)")],
                         ids=["enospc", "erofs", "library-error"])
def test_a_failed_write_names_the_target_and_leaves_no_trace(tmp_path, exc):
    target = tmp_path / "lora.safetensors"
    save_lora_file(str(target), TENSORS, {"v": "1"})
    before = target.read_bytes()
    with pytest.raises(KilnError) as e:
        write_atomically(str(target), _fails_half_way(exc), "the LoRA", "Free disk space.")
    msg = str(e.value)
    assert str(target) in msg and " free " in msg and "Free disk space." in msg
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors"]


# --- captions (item 4) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, enc", [("café, naïve".encode("utf-8-sig"), None),
                                      ("café, naïve".encode("cp1252"), "cp1252"),
                                      ("café, naïve".encode("utf-16"), "utf-16")],
                         ids=["utf8-bom", "cp1252", "utf16"])
def test_caption_encodings(tmp_path, caplog, raw, enc):
    (tmp_path / "a.txt").write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        caption, found = read_caption(str(tmp_path / "a.png"), ".txt", "tok")
    assert (caption, found) == ("café, naïve", True)
    warned = [r.getMessage() for r in caplog.records]
    if enc:
        assert any("a.txt" in m and enc in m and "not UTF-8" in m for m in warned), warned
    else:
        assert not warned


def test_empty_caption_file_gets_the_class_token_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("  \n")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert read_caption(str(tmp_path / "a.png"), ".txt", "mytoken") == ("mytoken", True)
    assert any("a.txt" in r.getMessage() and "empty" in r.getMessage() for r in caplog.records)


# --- 16-bit images (item 15) ------------------------------------------------------------------------------

def test_16_bit_png_converts_by_the_format_range_like_its_8_bit_copy(tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 129, size=(16, 24), dtype=np.uint8)  # at most half bright
    Image.fromarray(eight, "L").save(tmp_path / "8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16.png")  # the same picture, 16 bit
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    a, b = np.asarray(open_image(str(tmp_path / "8.png"))), np.asarray(open_image(str(tmp_path / "16.png")))
    assert a.shape == b.shape == (16, 24, 3)
    assert np.array_equal(a, b)


# --- black masks (item 5) ---------------------------------------------------------------------------------

def test_an_all_black_mask_is_named_in_a_warning_and_normalised_loss_stays_finite(tmp_path, caplog):
    data = make_dataset(tmp_path / "d", count=3)
    black = data["masks"][1]
    Image.new("L", Image.open(black).size, 0).save(black)
    ds = build_dataset(subsets_from_folder(str(data["train_dir"])), BucketConfig((64, 64), True, 32, 128, 32))
    ds = ds.with_masks("folder", str(data["mask_dir"]), missing_is_white=False)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        cache = encode_dataset(ds, lambda px: torch.nn.functional.avg_pool2d(px, 8).repeat(1, 2, 1, 1)[:, :4], "v")
    warned = [r.getMessage() for r in caplog.records if "entirely black" in r.getMessage()]
    assert len(warned) == 1 and data["images"][1].name in warned[0]
    mask = next(s.mask for s in cache.samples if s.path == str(data["images"][1]))
    err = torch.rand(1, 4, *mask.shape[-2:])
    loss = per_sample_loss(err, mask[None], normalize_by_area=True)
    assert torch.isfinite(loss).all() and float(loss) == 0.0


# --- resume_from a LoRA of another rank (item 11) ---------------------------------------------------------

def test_loading_a_lora_of_another_rank_is_refused_naming_both_ranks_and_the_module():
    def net(rank):
        root = nn.Sequential(nn.Linear(8, 8))
        return LoRANetwork(root, [TargetRule(r"0", ("linear",), rank, 1.0)], lambda p: f"lora_m{p}")
    saved = net(1).kohya_state_dict()
    target = net(4)
    before = {k: v.clone() for k, v in target.kohya_state_dict().items()}
    with pytest.raises(ValueError) as e:
        target.load_kohya_state_dict(saved)
    assert "lora_m0" in str(e.value) and "rank 1" in str(e.value) and "rank 4" in str(e.value)
    assert all(torch.equal(v, target.kohya_state_dict()[k]) for k, v in before.items())


# --- kohya's readers (item 9) -----------------------------------------------------------------------------

def test_sd3_modelspec_architecture_uses_kohyas_names():
    from types import SimpleNamespace as NS
    from trainer_core.families.sd3 import modelspec_architecture

    from torch import nn
    from trainer_core.families.sd3 import model_type

    def mmdit(depth, self_attn=False, qk_norm=False):  # kohya: q/k norms mean SD3.5
        ln_q = nn.LayerNorm(4) if qk_norm else nn.Identity()
        return NS(joint_blocks=[NS(x_block=NS(x_block_self_attn=self_attn, attn=NS(ln_q=ln_q))) for _ in range(depth)])
    assert modelspec_architecture(mmdit(24)) == "stable-diffusion-3-medium/lora"
    assert modelspec_architecture(mmdit(24, True, True)) == "stable-diffusion-3-5-medium/lora"
    assert modelspec_architecture(mmdit(38, False, True)) == "stable-diffusion-3-5-large/lora"
    assert [model_type(mmdit(24)), model_type(mmdit(24, True, True)), model_type(mmdit(2, False, True))] == \
        ["medium", "5-medium", "5-large"]  # ss_base_model_version, as kohya writes it
