"""Cache Latents in a real ComfyUI with the tiny SD1 checkpoint's VAE: the disk and memory caches (VAE
calls counted on the real VAE object), flip_aug from Load Dataset, random_crop refused, progress with ETA,
and a short training run on flipped latents."""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from fixtures.kiln_nodes import DATASET, kiln_error


@pytest.fixture(scope="module")
def loaded(comfy, sd1_checkpoint):
    return comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)


@pytest.fixture(scope="module")
def vae(loaded):
    return loaded[2]


@pytest.fixture
def nodes_module(comfy):
    """Kiln's dataset_nodes module as ComfyUI loaded it; its in-memory store is emptied around each test."""
    mod = sys.modules[comfy.node_class("KilnCacheLatents").__module__]
    mod.MEMORY.clear()
    yield mod
    mod.MEMORY.clear()


@pytest.fixture
def vae_images(vae, monkeypatch):
    """Counts the images the real VAE encodes (wraps this VAE object's own encode)."""
    counter = {"calls": 0, "images": 0}
    original = vae.encode

    def counting(pixels, *a, **kw):
        counter["calls"] += 1
        counter["images"] += pixels.shape[0]
        return original(pixels, *a, **kw)
    monkeypatch.setattr(vae, "encode", counting)
    return counter


def load(comfy, folder, **kw):
    return comfy.run_node("KilnLoadDataset", folder=str(folder), **{**DATASET, **kw})[0]


def test_disk_cache_second_run_encodes_nothing(comfy, vae, dataset_dir, nodes_module, vae_images, tmp_path):
    ds = load(comfy, dataset_dir["train_dir"])
    n = len(dataset_dir["images"])
    first = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4, disk_cache=True,
                           cache_folder=str(tmp_path / "cache"))
    assert vae_images["images"] == n and len(list((tmp_path / "cache").glob("*.safetensors"))) == n
    stats = first[0].cache.stats
    assert (stats.encoded, stats.from_disk) == (n, 0)
    nodes_module.MEMORY.clear()  # as after a restart: only the disk remains
    second = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=2, disk_cache=True,
                            cache_folder=str(tmp_path / "cache"))
    assert vae_images["images"] == n and second[0].cache.stats.from_disk == n
    assert comfy.progress[-1][0] == comfy.progress[-1][1] > 0  # nothing to encode, yet the bar ends full
    assert f"{n} from the disk cache" in second.ui["text"][0]
    for a, b in zip(first[0].cache.samples, second[0].cache.samples):
        assert torch.equal(a.latent, b.latent)


def test_memory_reuse_without_disk(comfy, vae, dataset_dir, nodes_module, vae_images):
    ds = load(comfy, dataset_dir["train_dir"])
    n = len(dataset_dir["images"])
    comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)
    assert vae_images["images"] == n
    masked = comfy.run_node("KilnMaskSource", dataset=ds, mode="folder", mask_folder=str(dataset_dir["mask_dir"]),
                            missing_mask_is_white=False, dilation=0)[0]
    out = comfy.run_node("KilnCacheLatents", dataset=masked, vae=vae, batch_size=3)[0]  # masks on: new entries
    assert vae_images["images"] == 2 * n and all(s.mask is not None for s in out.cache.samples)
    again = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=1)[0]  # masks off again: reused
    assert vae_images["images"] == 2 * n and again.cache.stats.from_memory == n
    assert all(s.mask is None for s in again.cache.samples)


def test_default_cache_folder_is_a_system_user_folder(comfy, vae, dataset_dir, nodes_module, tmp_path, monkeypatch):
    monkeypatch.setattr(comfy.folder_paths, "user_directory", str(tmp_path / "user"))
    ds = load(comfy, dataset_dir["train_dir"])
    out = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4, disk_cache=True, cache_folder="")
    folder = tmp_path / "user" / "__kiln_cache" / "latents"
    assert len(list(folder.glob("*.safetensors"))) == len(dataset_dir["images"])
    assert str(folder) in out.ui["text"][0]


def test_progress_bar_and_eta_text(comfy, vae, dataset_dir, nodes_module, caplog):
    ds = load(comfy, dataset_dir["train_dir"])
    n = len(dataset_dir["images"])
    with caplog.at_level(logging.INFO, logger="kiln"):
        comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=3)
    assert comfy.progress[-1][:2] == (n, n)
    texts = [d["text"].decode() if isinstance(d["text"], bytes) else d["text"]
             for e, d in comfy.events if e == "progress_text"]
    assert texts and all("images" in t for t in texts) and "ETA" in texts[0] and texts[-1].startswith(f"{n}/{n} images")
    assert f"Cache Latents: {n}/{n} images, ETA 0 s" in caplog.text


@pytest.mark.slow
def test_flip_aug_from_load_dataset_trains(comfy, loaded, dataset_dir, nodes_module, vae_images):
    model, clip, vae = loaded
    ds = load(comfy, dataset_dir["train_dir"], flip_aug=True)
    assert "flip_aug" in ds.dataset.summary()
    cached = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    n = len(dataset_dir["images"])
    assert vae_images["images"] == 2 * n
    samples = cached.cache.samples
    assert all(s.flipped_latent is not None and s.flipped_latent.shape == s.latent.shape for s in samples)
    assert not any(torch.allclose(s.flipped_latent, s.latent) for s in samples)
    cfg = comfy.run_node("KilnLoraConfig", rank=2, alpha=2.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    out = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=cfg, steps=3,
                         learning_rate=1e-3, optimizer="AdamW", lr_scheduler="constant", warmup_steps=0, grad_accum=1,
                         max_grad_norm=1.0, seed=0, precision="fp32", gradient_checkpointing=False, loss_type="l2",
                         min_snr_gamma=0.0, mask_normalize=False, prior_loss_weight=1.0, sample_prompts="",
                         sample_every=0, sample_steps=1, sample_cfg=1.0)
    meta = out[1].metadata
    assert meta["ss_flip_aug"] == "True" and len(samples) == n
    assert all(sub["flip_aug"] is True and sub["random_crop"] is False
               for block in json.loads(meta["ss_datasets"]) for sub in block["subsets"])


def test_random_crop_in_a_toml_is_refused_at_cache_latents(comfy, vae, dataset_dir, nodes_module, vae_images, tmp_path):
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\nresolution = 64\n\n[[datasets]]\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{dataset_dir["image_dir"]}"\n  random_crop = true\n')
    ds = comfy.run_node("KilnLoadDataset", folder=str(toml), **DATASET)[0]  # Load Dataset accepts the key
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)
    msg = kiln_error(e)
    assert msg.startswith("Cache Latents: subset 1") and str(dataset_dir["image_dir"]) in msg
    assert "random_crop = false" in msg and vae_images["calls"] == 0


def test_no_half_vae_encodes_in_fp32_and_puts_the_vae_back(comfy, sd1_checkpoint, dataset_dir, nodes_module):
    """kohya's no_half_vae on a VAE held in bf16: the encode runs in fp32 (different latents, a different cache
    key, so no bf16 latent is reused), and afterwards the VAE's dtype and every weight are exactly as before."""
    vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)[2]  # a VAE of its own
    with torch.inference_mode():  # as ComfyUI itself would load a bf16 VAE
        vae.first_stage_model.to(torch.bfloat16)
    vae.vae_dtype = torch.bfloat16
    before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    ds = load(comfy, dataset_dir["train_dir"])
    half = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0].cache
    full = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4, no_half_vae=True)[0].cache
    assert full.stats.encoded == len(full.samples) and full.encoder_id != half.encoder_id
    assert not torch.equal(full.samples[0].latent, half.samples[0].latent)
    assert vae.vae_dtype == torch.bfloat16
    after = vae.first_stage_model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())
