"""The generated fixtures are what the other tests assume: ComfyUI's own loaders accept the tiny SD1 and
SD3 checkpoints (detected as SD15 / SD3, finite outputs) and the dataset has the promised shape."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image


def test_checkpoint_loads_as_sd15(comfy, sd1_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    # ComfyUI warns "unet missing" / "clip missing" / "Missing VAE keys": every weight must come from the file.
    assert not [r.getMessage() for r in caplog.records if "missing" in r.getMessage().lower()]
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(vae.first_stage_model).__name__ == "TAESD"

    (cond,) = comfy.run_node("CLIPTextEncode", clip=clip, text="kiln toy, a red circle")
    emb, extra = cond[0]
    assert emb.shape == (1, 77, 768) and torch.isfinite(emb).all()
    assert torch.isfinite(extra["pooled_output"]).all()

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (latent,) = comfy.run_node("VAEEncode", pixels=image, vae=vae)
    assert latent["samples"].shape == (1, 4, 8, 8) and torch.isfinite(latent["samples"]).all()
    assert latent["samples"].std() > 0  # the encoder is not degenerate: images map to distinct latents

    (decoded,) = comfy.run_node("VAEDecode", samples=latent, vae=vae)
    assert decoded.shape == (1, 64, 64, 3) and torch.isfinite(decoded).all()


def test_unet_forward_is_finite(comfy, sd1_checkpoint):
    model, _clip, _vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    unet = model.model.diffusion_model
    x = torch.randn(2, 4, 8, 12)  # batch of two 64x96 px latents
    with torch.inference_mode():
        out = unet(x.to(model.model.get_dtype()), torch.tensor([10.0, 900.0]),
                   context=torch.randn(2, 77, 768).to(model.model.get_dtype()))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_checkpoint_loads_as_sd3(comfy, sd3_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd3_checkpoint)
    assert not [r.getMessage() for r in caplog.records if "missing" in r.getMessage().lower()]
    assert type(model.model.model_config).__name__ == "SD3"
    assert type(model.model.diffusion_model).__name__ == "OpenAISignatureMMDITWrapper"
    assert model.model.diffusion_model.depth == 2 and model.model.diffusion_model.hidden_size == 128
    assert type(vae.first_stage_model).__name__ == "TAESD" and vae.latent_channels == 16
    assert clip.cond_stage_model.clip_l is not None  # CLIP-L only: SD3ClipModel zero-fills G and T5
    assert clip.cond_stage_model.clip_g is None and clip.cond_stage_model.t5xxl is None

    (cond,) = comfy.run_node("CLIPTextEncode", clip=clip, text="kiln toy, a red circle")
    emb, extra = cond[0]
    assert emb.shape == (1, 77, 4096) and torch.isfinite(emb).all()
    assert emb[..., :768].std() > 0 and not emb[..., 768:].any()  # CLIP-L, then zero padding to T5's width
    pooled = extra["pooled_output"]
    assert pooled.shape == (1, 2048) and torch.isfinite(pooled).all() and pooled[:, :768].std() > 0

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (latent,) = comfy.run_node("VAEEncode", pixels=image, vae=vae)
    assert latent["samples"].shape == (1, 16, 8, 8) and torch.isfinite(latent["samples"]).all()
    assert latent["samples"].std() > 0

    (decoded,) = comfy.run_node("VAEDecode", samples=latent, vae=vae)
    assert decoded.shape == (1, 64, 64, 3) and torch.isfinite(decoded).all()


def test_sd3_mmdit_forward_and_one_sampler_step_are_finite(comfy, sd3_checkpoint):
    model, clip, _vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd3_checkpoint)
    mmdit = model.model.diffusion_model
    x = torch.randn(2, 16, 8, 12)  # batch of two 64x96 px latents (not square: exercises the pos_embed crop)
    dtype = model.model.get_dtype()
    with torch.inference_mode():
        out = mmdit(x.to(dtype), torch.tensor([10.0, 900.0]), context=torch.randn(2, 77, 4096).to(dtype),
                    y=torch.randn(2, 2048).to(dtype))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 0

    (positive,) = comfy.run_node("CLIPTextEncode", clip=clip, text="kiln toy, a red circle")
    (negative,) = comfy.run_node("ConditioningZeroOut", conditioning=positive)  # as SD3 workflows do
    (empty,) = comfy.run_node("EmptySD3LatentImage", width=64, height=96, batch_size=1)
    (sampled,) = comfy.run_node("KSampler", model=model, seed=0, steps=1, cfg=2.0, sampler_name="euler",
                                scheduler="simple", positive=positive, negative=negative, latent_image=empty,
                                denoise=1.0)
    assert sampled["samples"].shape == (1, 16, 12, 8) and torch.isfinite(sampled["samples"]).all()
    assert sampled["samples"].std() > 0


def test_dataset_fixture(dataset_dir):
    d = dataset_dir
    assert d["image_dir"].name == "5_kiln toy" and d["image_dir"].parent == d["train_dir"]
    images = d["images"]
    assert len(images) == 8 and all(p.parent == d["image_dir"] for p in images)
    assert {Image.open(p).size for p in images} == {(64, 64), (96, 64)}
    assert {p.suffix for p in images} == {".png", ".jpg"}

    captions = sorted(d["image_dir"].glob("*.txt"))
    assert len(captions) == len(images) - 1 and len(d["uncaptioned"]) == 1
    assert not d["uncaptioned"][0].with_suffix(".txt").exists()

    assert d["rgba"]
    for p in d["rgba"]:
        alpha = Image.open(p).getchannel("A")
        assert alpha.getextrema() == (0, 255)  # has a transparent region and an opaque one

    for image, mask in zip(images, d["masks"]):
        assert mask.parent == d["mask_dir"] and mask.stem == image.stem and mask.suffix == ".png"
        m = Image.open(mask)
        assert m.size == Image.open(image).size
        red = np.asarray(m)[..., 0] if m.mode == "RGB" else np.asarray(m)
        assert set(np.unique(red).tolist()) == {0, 127, 255}


def test_error_helpers(tmp_path):
    from fixtures.datasets import make_empty_dataset, write_corrupt_image

    folder = make_empty_dataset(tmp_path / "empty")
    assert folder.is_dir() and not any(folder.iterdir())
    bad = write_corrupt_image(tmp_path / "bad.png")
    with pytest.raises(Exception):
        Image.open(bad).load()
