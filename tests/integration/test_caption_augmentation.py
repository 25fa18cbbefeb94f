"""Caption augmentation and per-[[datasets]] resolution through the real nodes, in process."""
from __future__ import annotations

import json

import pytest

from fixtures.kiln_nodes import DATASET
from test_train_sd1 import TRAIN as SD1_TRAIN

pytestmark = pytest.mark.slow  # both train 8 steps through the text encoder

TRAIN = SD1_TRAIN | dict(steps=8, learning_rate=1e-3, precision="fp32", sample_every=0, sample_steps=1)


@pytest.fixture(scope="module")
def loaded(comfy, sd1_checkpoint):
    return comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)


@pytest.fixture(scope="module")
def lora_config(comfy):
    return comfy.run_node("KilnLoraConfig", rank=2, alpha=2.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                          rank_dropout=0.0, module_dropout=0.0)[0]


def test_shuffle_and_prefix_reach_the_text_encoder_as_varied_captions(comfy, loaded, lora_config, dataset_dir):
    model, clip, vae = loaded
    out = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **DATASET, shuffle_caption=True,
                         caption_prefix="kilnprefix,")
    assert "captions: prefix 'kilnprefix,', shuffle" in out[1]
    cached = comfy.run_node("KilnCacheLatents", dataset=out[0], vae=vae, batch_size=4)[0]
    trained = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=lora_config, **TRAIN)
    meta = trained[1].metadata
    images = len(dataset_dir["images"])
    # without augmentation at most one caption per image could reach the conditioning
    assert int(meta["kiln_distinct_captions"]) > images
    assert int(meta["kiln_text_encoder_calls"]) >= int(meta["kiln_distinct_captions"])
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "0"
    subset = json.loads(meta["ss_datasets"])[0]["subsets"][0]
    assert subset["caption_prefix"] == "kilnprefix," and subset["shuffle_caption"] is True
    assert "distinct captions trained" in trained.ui["text"][0]


def test_toml_blocks_train_at_their_own_resolutions(comfy, loaded, lora_config, dataset_dir, tmp_path):
    model, clip, vae = loaded
    image_dir = str(dataset_dir["image_dir"]).replace("\\", "/")
    toml = tmp_path / "two_blocks.toml"
    toml.write_text(f"""
[general]
caption_extension = ".txt"
batch_size = 2

[[datasets]]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{image_dir}"
  shuffle_caption = true
  keep_tokens = 1

[[datasets]]
resolution = [96, 64]
batch_size = 3
  [[datasets.subsets]]
  image_dir = "{image_dir}"
  caption_prefix = "wide,"
""")
    out = comfy.run_node("KilnLoadDataset", folder=str(toml), **DATASET)
    assert "dataset #1: 64x64, buckets 32-128 step 32" in out[1] and "dataset #2: 96x64, no buckets" in out[1]
    cached = comfy.run_node("KilnCacheLatents", dataset=out[0], vae=vae, batch_size=4)[0]
    n = len(dataset_dir["images"])
    shapes = [tuple(s.latent.shape[-2:]) for s in cached.cache.samples]
    assert set(shapes[n:]) == {(8, 12)}  # block 2: every image at 96x64, whatever its aspect ratio
    assert (8, 8) in shapes[:n]          # block 1: the square images keep their square bucket
    trained = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=lora_config,
                             **{**TRAIN, "steps": 4})
    blocks = json.loads(trained[1].metadata["ss_datasets"])
    assert [b["resolution"] for b in blocks] == [[64, 64], [96, 64]]
    assert [b["batch_size_per_device"] for b in blocks] == [2, 3]  # each block batched by its own batch_size
    assert {s.batch_size for s in cached.cache.samples[n:]} == {3}
    assert blocks[0]["subsets"][0]["keep_tokens"] == 1 and blocks[1]["subsets"][0]["caption_prefix"] == "wide,"
    assert "ss_shuffle_caption" not in trained[1].metadata  # the subsets disagree: per subset in ss_datasets only
