"""Datasets from in-memory images (Dataset from Images) and the dataset preview: buckets as for files, latent
cache keyed by pixel and mask content, masks handed over with the images, and a preview whose mask overlay is
pixel-aligned with the cropped training view (checked on an asymmetric image against hand-computed geometry)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer_core.data.cache import encode_dataset
from trainer_core.data.buckets import BucketConfig
from trainer_core.data.dataset import Subset, build_dataset, dataset_from_images, subsets_from_folder
from trainer_core.data.images import MemoryImage
from trainer_core.data.masks import INPUT_MASKS
from trainer_core.report.dataset_preview import CELL, KEEP, TEXT_H, TINT, overlay, preview_grid, training_view
from trainer_core.errors import KilnError
from trainer_core.data.latent_store import MemoryStore

BUCKETS = BucketConfig((64, 64), True, 32, 128, 32)
NO_BUCKETS = BucketConfig((64, 64), False, 32, 128, 32)


def vae(px: torch.Tensor) -> torch.Tensor:
    """A stand-in encoder: 8x down-sampling (4 channels)."""
    z = F.avg_pool2d(px, 8)
    return torch.cat([z, z[:, :1]], dim=1)


class Counting:
    def __init__(self):
        self.images = 0

    def __call__(self, px):
        self.images += px.shape[0]
        return vae(px)


def pictures(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in [(64, 64), (128, 48), (48, 128), (80, 80)]]


def masks_for(images, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random(im.shape[:2]) > 0.5).astype(np.uint8) * 255 for im in images]


def from_images(images, masks=None, captions=None, buckets=BUCKETS, repeats=3, class_tokens="toy"):
    mem = [MemoryImage.of(im, None if masks is None else m) for im, m in zip(images, masks or [None] * len(images))]
    subset = Subset("Dataset from Images", repeats, class_tokens, mask_mode=INPUT_MASKS if masks else "none",
                    in_memory=True)
    return dataset_from_images(mem, captions or [""] * len(images), subset, buckets)


def test_buckets_and_captions_are_those_of_the_same_images_as_files(tmp_path):
    images = pictures()
    folder = tmp_path / "3_toy"
    folder.mkdir()
    for k, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{k}.png")
    files = build_dataset(subsets_from_folder(str(tmp_path)), BUCKETS)
    mem = from_images(images, captions=["a red thing", "", "  ", "b"])
    assert [i.bucket for i in mem.items] == [i.bucket for i in files.items] == [(64, 64), (96, 32), (32, 96), (64, 64)]
    assert [i.size for i in mem.items] == [(64, 64), (128, 48), (48, 128), (80, 80)]
    # an empty caption falls back to the class token, as a missing .txt does
    assert [i.caption for i in mem.items] == ["a red thing", "toy", "toy", "b"]
    assert mem.sample_repeats() == [3, 3, 3, 3]
    assert [i.path for i in mem.items] == [f"Dataset from Images/image {k}" for k in range(4)]
    assert "Dataset from Images — 4 images × 3 repeats" in mem.summary()


def test_same_pixels_and_masks_encode_nothing_again_and_a_changed_one_alone_re_encodes():
    memory = MemoryStore()
    encoder = Counting()
    images, masks = pictures(), masks_for(pictures())
    first = encode_dataset(from_images(images, masks), encoder, "vae-1", memory=memory)
    assert encoder.images == 4 and first.stats.encoded == 4
    # a new run: fresh arrays (copies), same content -> everything from memory
    second = encode_dataset(from_images([im.copy() for im in images], [m.copy() for m in masks]), encoder, "vae-1",
                            memory=memory)
    assert encoder.images == 4 and second.stats.encoded == 0 and second.stats.from_memory == 4
    for a, b in zip(first.samples, second.samples):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.mask, b.mask)
    # one changed pixel re-encodes that image; one changed mask pixel re-encodes that mask's image
    images2 = [im.copy() for im in images]
    images2[1][5, 7, 0] ^= 1
    masks2 = [m.copy() for m in masks]
    masks2[2][3, 3] = 255 - masks2[2][3, 3]
    third = encode_dataset(from_images(images2, masks2), encoder, "vae-1", memory=memory)
    assert third.stats.encoded == 2 and encoder.images == 6
    # the same pixels without masks is another entry (a latent cached without a mask is never served with one)
    fourth = encode_dataset(from_images(images), encoder, "vae-1", memory=memory)
    assert fourth.stats.encoded == 4 and all(s.mask is None for s in fourth.samples)


def test_input_mask_is_cropped_with_its_image_into_the_latent_mask():
    # 128x64 image, 64x64 bucket: resized 128x64 (scale 1), crop left (128-64)/2 = 32. Mask white on x < 64:
    # after the crop x < 32 is white, i.e. latent columns 0..3 of 8 trained, 4..7 not.
    image = np.full((64, 128, 3), 128, np.uint8)
    mask = np.zeros((64, 128), np.uint8)
    mask[:, :64] = 255
    cache = encode_dataset(from_images([image], [mask], buckets=NO_BUCKETS), vae, "vae-1")
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1
    assert torch.allclose(cache.samples[0].mask, expected)


def test_masks_from_the_input_and_from_alpha_mask_source_are_one_or_the_other():
    images = pictures()
    with_masks = from_images(images, masks_for(images))
    for mode in ("alpha", "folder", "none"):
        with pytest.raises(KilnError, match="Alpha/Mask Source.*masks input of Dataset from Images"):
            with_masks.with_masks(mode, None, False)
    with pytest.raises(KilnError, match="no file names"):
        from_images(images).with_masks("folder", "/tmp", False)
    # alpha mode on RGB pixels: trained whole, as kohya reads an image without alpha, with one note
    alpha = from_images(images).with_masks("alpha", None, False)
    assert "4 of 4 images have no alpha channel" in alpha.report[0]
    cache = encode_dataset(alpha, vae, "vae-1")
    assert all(torch.equal(s.mask, torch.ones_like(s.mask)) for s in cache.samples)


def test_rgba_pixels_mask_by_their_alpha_channel():
    rgba = np.full((64, 64, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, 32:, 3] = 0  # right half transparent
    ds = from_images([rgba]).with_masks("alpha", None, False)
    assert ds.report == []
    cache = encode_dataset(ds, vae, "vae-1")
    assert torch.equal(cache.samples[0].mask[0, :, :4], torch.ones(8, 4))
    assert torch.equal(cache.samples[0].mask[0, :, 4:], torch.zeros(8, 4))


def asymmetric():
    """A 200x100 image and a mask trained on x < 125 and y >= 25 (neither symmetric nor centred).

    Into a 64x64 bucket: scale max(64/200, 64/100) = 0.64 -> 128x64, crop left (128 - 64) / 2 = 32, top 0.
    So the mask's edge x = 125 lands at 125 * 0.64 - 32 = 48 in the tile and y = 25 at 16: trained are
    columns < 48 of rows >= 16. (A mask stretched onto the bucket instead, kohya's bug, would end at 40.)"""
    image = np.zeros((100, 200, 3), np.uint8)
    image[..., 0] = np.linspace(40, 240, 200, dtype=np.uint8)[None, :]   # a horizontal ramp: crops show
    image[..., 1] = 180
    image[..., 2] = np.linspace(200, 60, 100, dtype=np.uint8)[:, None]
    mask = np.zeros((100, 200), np.uint8)
    mask[25:, :125] = 255
    return image, mask


def test_preview_overlay_is_aligned_with_the_cropped_training_view():
    image, mask = asymmetric()
    ds = from_images([image], [mask], buckets=NO_BUCKETS)
    pixels, m = training_view(ds, 0)
    assert pixels.shape == (3, 64, 64) and m.shape == (1, 64, 64)
    # the training view's pixels are the resized image's columns 32..95
    resized = np.asarray(Image.fromarray(image).resize((128, 64), Image.Resampling.LANCZOS), np.float32) / 255
    assert torch.allclose(pixels, torch.from_numpy(resized[:, 32:96]).permute(2, 0, 1), atol=1e-6)
    # the mask: trained left of column 48 below row 16 (a pixel of resampling ringing at the edges)
    assert (m[0, 18:, :46] > 0.99).all() and (m[0, :14, :] < 0.01).all() and (m[0, :, 50:] < 0.01).all()
    shown = overlay(pixels, m)
    assert torch.allclose(shown[:, 18:, :46], pixels[:, 18:, :46], atol=0.005)  # trained: unchanged
    dark = (KEEP * pixels + TINT).clamp(0, 1)
    assert torch.allclose(shown[:, :, 50:], dark[:, :, 50:], atol=0.01)     # masked out: darkened and tinted
    assert (shown[:, :, 50:].sum(0) < pixels[:, :, 50:].sum(0)).all()


def test_preview_grid_shows_the_tiles_in_order_with_their_text():
    image, mask = asymmetric()
    plain = np.full((64, 96, 3), 230, np.uint8)
    ds = from_images([image, plain, plain], [mask, np.full((64, 96), 255, np.uint8)] * 1 + [np.zeros((64, 96), np.uint8)],
                     captions=["a very long caption " * 10, "short", ""], buckets=NO_BUCKETS)
    grid = np.asarray(preview_grid(ds, count=2)).astype(int)
    pad, text_h = 6, TEXT_H
    assert grid.shape == (pad + CELL + text_h + pad, 2 * (CELL + pad) + pad, 3)
    # tile 0 is the 64x64 training view scaled x3: its mask edge at column 48 -> 144 in the grid cell
    row = pad + 100
    left, right = grid[row, pad + 20:pad + 130], grid[row, pad + 160:pad + CELL - 4]
    view, _ = training_view(ds, 0)
    assert abs(left.mean() - view[:, 33, 7:43].mean().item() * 255) < 12    # shown as trained
    assert right.sum(-1).mean() < 0.6 * grid[row, pad + 20:pad + 130].sum(-1).mean()   # darkened
    # tile 1 (all white mask, plain grey) shows its pixels unchanged
    assert np.abs(grid[pad + 100, 2 * pad + CELL + 100] - 230).max() <= 1
    # text under the tiles: bucket, repeats and caption drawn in light pixels
    band = grid[pad + CELL + 1:pad + CELL + text_h, pad:pad + CELL]
    assert (band.min(-1) > 150).sum() > 30
    assert preview_grid(ds, count=8).size[0] == 3 * (CELL + pad) + pad   # at most the images there are


def test_the_same_image_twice_is_encoded_once():
    """ComfyUI's folder loader lists the images of an N_name sub-folder N times: each distinct image (with its mask
    and crop) goes through the VAE once, and every copy gets that latent."""
    images, masks = pictures(), masks_for(pictures())
    encoder = Counting()
    cache = encode_dataset(from_images(images * 3, masks * 3), encoder, "vae-1")
    assert encoder.images == 4 and cache.stats.encoded == 4 and cache.stats.from_memory == 8
    for k in range(4):
        assert cache.samples[k].latent is cache.samples[k + 4].latent is cache.samples[k + 8].latent
    # the same pixels with another mask is another latent entry
    other = [m.copy() for m in masks]
    other[0] = 255 - other[0]
    assert encode_dataset(from_images(images * 2, masks + other), Counting(), "vae-1").stats.encoded == 5
