"""kohya's dataset flags (train_data_dir, reg_data_dir, resolution, ...) as the dataset TOML that describes the same
dataset: the same subsets, and the same batches for a seed, as the dataset TOML a user would write for it."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from fixtures.datasets import make_dataset
from trainer_core.data.cache import encode_dataset
from trainer_core.data.dataset import build_dataset
from trainer_core.data.toml_config import load_dataset_toml
from trainer_core.errors import KilnError
from trainer_core.kohya.dataset_flags import dataset_document, subdir_subsets, toml_text
from trainer_core.training.epochs import BatchStream


def encode(px: torch.Tensor) -> torch.Tensor:
    """8x down-sampling into 4 channels: a deterministic encoder whose latents carry the pixels (and their crop)."""
    return F.avg_pool2d(torch.cat([px, px[:, :1]], 1), 8)


def folders(root):
    """kohya_ss's layout: train/ with two N_name folders (one with an underscore in its class), reg/ with one,
    plus a folder without repeats and a loose image, which kohya does not read."""
    a = make_dataset(root / "a", count=3)
    b = make_dataset(root / "b", seed=1, count=2)
    reg = make_dataset(root / "r", seed=2, count=4)
    train, regs = root / "train", root / "reg"
    train.mkdir()
    regs.mkdir()
    a["image_dir"].rename(train / "3_kiln toy")
    b["image_dir"].rename(train / "2_my_char")
    reg["image_dir"].rename(regs / "1_toy")
    (train / "no_repeats").mkdir()
    (train / "loose.png").write_bytes((train / "3_kiln toy" / sorted(p.name for p in (train / "3_kiln toy").glob(
        "*.png"))[0]).read_bytes())
    return train, regs


def test_subfolders_are_read_by_kohyas_rule(tmp_path):
    train, _ = folders(tmp_path)
    subsets, notes = subdir_subsets(str(train), False, "train_data_dir", "cmd")
    assert [(s["num_repeats"], s["class_tokens"]) for s in subsets] == [(2, "my_char"), (3, "kiln toy")]
    assert any("'no_repeats' has no repeat count" in n for n in notes)
    assert any("1 image(s) directly in" in n for n in notes)


FLAGS = {"train_data_dir": "train", "reg_data_dir": "reg", "resolution": "64,48", "train_batch_size": 2,
         "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16,
         "caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1, "flip_aug": True,
         "caption_tag_dropout_rate": 0.1}

# the dataset TOML a user would write for the same dataset, by hand
EQUIVALENT = '''
[general]
resolution = [64, 48]
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
flip_aug = true
caption_tag_dropout_rate = 0.1

[[datasets]]
  [[datasets.subsets]]
  image_dir = "train/2_my_char"
  num_repeats = 2
  class_tokens = "my_char"

  [[datasets.subsets]]
  image_dir = "train/3_kiln toy"
  num_repeats = 3
  class_tokens = "kiln toy"

  [[datasets.subsets]]
  image_dir = "reg/1_toy"
  num_repeats = 1
  class_tokens = "toy"
  is_reg = true
'''


def batches(path, epochs=3, seed=7):
    """(path, caption, flipped?, latent) of every sample drawn in ``epochs`` epochs of the run's batch stream."""
    subsets, buckets, batch_size = load_dataset_toml(str(path))
    cache = encode_dataset(build_dataset(subsets, buckets, batch_size), encode, "test")
    stream = BatchStream(cache, batch_size, seed)
    out = []
    for epoch, batch in itertools.takewhile(lambda eb: eb[0] <= epochs, stream):
        out.append([(cache.samples[i].path, cache.samples[i].caption, cache.samples[i].repeats,
                     cache.samples[i].is_reg, cache.samples[i].latent) for i in batch])
    return out, cache


def test_flags_train_the_batches_of_the_equivalent_dataset_toml(tmp_path, monkeypatch):
    train, _ = folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    doc, notes = dataset_document(FLAGS, lambda p: str(tmp_path / p), "cmd")
    (tmp_path / "from_flags.toml").write_text(toml_text(doc))
    (tmp_path / "by_hand.toml").write_text(EQUIVALENT)
    ours, cache = batches(tmp_path / "from_flags.toml")
    theirs, _ = batches(tmp_path / "by_hand.toml")
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert [x[:4] for x in a] == [x[:4] for x in b]
        assert all(torch.equal(x[4], y[4]) for x, y in zip(a, b))
    # kohya's balance: as many reg draws per epoch as training draws (3·3 + 2·2 = 13), the reg folder's 4 images
    # repeated round-robin; class tokens are the caption of the uncaptioned images; batches of 2
    reg = [s.repeats for s in cache.samples if s.is_reg]
    assert sum(reg) == sum(s.repeats for s in cache.samples if not s.is_reg) == 13 and sorted(reg) == [3, 3, 3, 4]
    assert {s.caption for s in cache.samples if "2_my_char" in s.path} >= {"my_char"}
    assert max(len(b) for b in ours) == 2
    assert not any("reg" in s.path and not s.is_reg for s in cache.samples)


def test_flags_are_kohyas_fallbacks_beneath_a_dataset_config(tmp_path):
    make_dataset(tmp_path / "d", count=2)
    (tmp_path / "ds.toml").write_text('[general]\nshuffle_caption = false\n[[datasets]]\nresolution = 64\n'
                                      '  [[datasets.subsets]]\n  image_dir = "d/train/5_kiln toy"\n')
    cfg = {"dataset_config": "ds.toml", "train_data_dir": "ignored", "shuffle_caption": True, "keep_tokens": 2,
           "resolution": "128", "caption_extension": ".txt"}
    doc, notes = dataset_document(cfg, lambda p: str(tmp_path / p), "cmd")
    assert doc["general"] == {"shuffle_caption": False, "keep_tokens": 2, "resolution": 128,
                              "caption_extension": ".txt"}
    assert any("train_data_dir ignored" in n for n in notes)
    (tmp_path / "merged.toml").write_text(toml_text(doc))
    subsets, buckets, _ = load_dataset_toml(str(tmp_path / "merged.toml"))
    # subset > dataset > general > flag: the TOML's own values win, the flags fill what it leaves out
    assert buckets.resolution == (64, 64) and subsets[0].captions.keep_tokens == 2
    assert not subsets[0].captions.shuffle_caption and subsets[0].image_dir == str(tmp_path / "d/train/5_kiln toy")
    assert dataset_document({"dataset_config": "ds.toml"}, lambda p: str(tmp_path / p), "cmd") == (None, [])


@pytest.mark.parametrize("cfg, message", [
    ({"train_data_dir": "train"}, "train_data_dir needs resolution"),
    ({"resolution": 512}, "no dataset: give dataset_config"),
    ({"train_data_dir": "reg", "resolution": 512}, "has no N_name sub-folders"),
    ({"train_data_dir": "nowhere", "resolution": 512}, "train_data_dir .*nowhere is not a folder"),
    ({"train_data_dir": "train", "resolution": "512x512"}, "resolution must be a size such as 512 or 768,512"),
])
def test_what_kohya_needs_is_asked_for(tmp_path, cfg, message):
    (tmp_path / "train" / "10_x").mkdir(parents=True)
    (tmp_path / "reg" / "x").mkdir(parents=True)
    with pytest.raises(KilnError, match=message):
        dataset_document(cfg, lambda p: str(tmp_path / p), "cmd")
