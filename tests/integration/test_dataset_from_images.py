"""Dataset from Images in a real ComfyUI (in process) with the tiny SD1 VAE: IMAGE lists/batches, MASK and
STRING inputs, the latent cache keyed on pixel and mask content (a re-run with new tensors of the same images
encodes nothing), the refusal of a second mask source, and the preview on all three dataset nodes (file and
in-memory paths give the same overlay for the same image and mask)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.datasets import make_dataset
from fixtures.kiln_nodes import kiln_error

BUCKETS = dict(resolution=64, batch_size=2, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
               bucket_reso_steps=32, bucket_no_upscale=False)


@pytest.fixture(scope="module")
def vae(comfy, sd1_checkpoint):
    return comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)[2]


@pytest.fixture
def memory(comfy):
    mod = sys.modules[comfy.node_class("KilnCacheLatents").__module__]
    mod.MEMORY.clear()
    yield mod.MEMORY
    mod.MEMORY.clear()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dfi"), count=4)


def as_image(path) -> torch.Tensor:
    """An image file as ComfyUI's loaders hand it over: [1, H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255)[None]


def as_mask(path) -> torch.Tensor:
    """A mask file's R channel as a MASK [1, H, W] (white = train)."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32)[..., 0] / 255)[None]


def from_images(comfy, data, masks="files", **kw):
    """Dataset from Images on the dataset's image files; masks: "files" (its mask files), None, or MASK tensors."""
    images = [as_image(p) for p in data["images"]]          # a list of differently sized images
    inputs = dict(images=images, repeats=3, class_tokens="kiln toy", **BUCKETS,
                  captions=[data["captions"].get(p, "") for p in data["images"]])
    if masks is not None:
        inputs["masks"] = [as_mask(p) for p in data["masks"]] if masks == "files" else masks
    return comfy.run_node("KilnDatasetFromImages", **{**inputs, **kw})


def test_image_list_masks_and_captions_make_a_dataset(comfy, data):
    out = from_images(comfy, data)
    ds = out[0].dataset
    assert [i.size for i in ds.items] == [data["sizes"][p] for p in data["images"]]
    # the same buckets as Load Dataset gives the files
    files = comfy.run_node("KilnLoadDataset", folder=str(data["train_dir"]), caption_extension=".txt",
                           class_tokens="", repeats=1, **BUCKETS)[0].dataset
    assert [i.bucket for i in ds.items] == [i.bucket for i in files.items]
    # captions per image; the uncaptioned one falls back to class_tokens
    assert [i.caption for i in ds.items] == [data["captions"].get(p, "kiln toy") for p in data["images"]]
    assert ds.sample_repeats() == [3] * 4 and ds.subsets[0].mask_mode == "input"
    assert "4 images × 3 repeats" in out[1] and "masks: from the masks input" in out[1]
    # one caption for all; a batch instead of a list
    batch = torch.cat([as_image(data["images"][0])] * 3)
    one = comfy.run_node("KilnDatasetFromImages", images=batch, repeats=1, class_tokens="", captions="a toy",
                         **BUCKETS)[0].dataset
    assert [i.caption for i in one.items] == ["a toy"] * 3 and one.subsets[0].mask_mode == "none"


def test_counts_that_do_not_match_are_refused(comfy, data):
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnDatasetFromImages", images=[as_image(p) for p in data["images"]], repeats=1, class_tokens="",
            masks=[as_mask(data["masks"][0])], **BUCKETS)
    assert "4 images but 1 masks" in kiln_error(e)
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnDatasetFromImages", images=[as_image(p) for p in data["images"]], repeats=1,
                       class_tokens="", captions=["a", "b"], **BUCKETS)
    assert "4 images but 2 captions" in kiln_error(e)


def test_re_run_with_the_same_images_encodes_nothing(comfy, data, vae, memory):
    first = comfy.run_node("KilnCacheLatents", dataset=from_images(comfy, data)[0], vae=vae, batch_size=4)
    assert first[0].cache.stats.encoded == 4 and first[0].cache.has_masks
    # a new run of the graph: new tensors holding the same pixels and masks
    second = comfy.run_node("KilnCacheLatents", dataset=from_images(comfy, data)[0], vae=vae, batch_size=4)
    assert second[0].cache.stats.encoded == 0 and second[0].cache.stats.from_memory == 4
    assert "0 encoded, 4 reused from memory" in second.ui["text"][0]
    # an edited mask re-encodes its image alone
    masks = [as_mask(p) for p in data["masks"]]
    masks[1] = 1 - masks[1]
    third = comfy.run_node("KilnCacheLatents", dataset=from_images(comfy, data, masks)[0],
                           vae=vae, batch_size=4)
    assert third[0].cache.stats.encoded == 1
    # the same latents the files give through Load Dataset + Alpha/Mask Source (folder), to float rounding
    files = comfy.run_node("KilnLoadDataset", folder=str(data["train_dir"]), caption_extension=".txt",
                           class_tokens="", repeats=1, **BUCKETS)[0]
    masked = comfy.run_node("KilnMaskSource", dataset=files, mode="folder", mask_folder=str(data["mask_dir"]),
                            missing_mask_is_white=False, dilation=0)[0]
    from_files = comfy.run_node("KilnCacheLatents", dataset=masked, vae=vae, batch_size=4)[0].cache
    for a, b in zip(first[0].cache.samples, from_files.samples):
        assert torch.allclose(a.latent, b.latent, atol=1e-4) and torch.allclose(a.mask, b.mask, atol=1e-6)


def test_mask_input_and_alpha_mask_source_is_an_error_naming_both(comfy, data):
    ds = from_images(comfy, data)[0]
    for mode in ("alpha", "folder", "none"):
        with pytest.raises(Exception) as e:
            comfy.run_node("KilnMaskSource", dataset=ds, mode=mode, mask_folder="", missing_mask_is_white=False)
        msg = kiln_error(e)
        assert "Alpha/Mask Source" in msg and "masks input of Dataset from Images" in msg


def test_preview_on_all_three_nodes(comfy, data):
    mem = from_images(comfy, data, preview_images=2)
    files = comfy.run_node("KilnLoadDataset", folder=str(data["train_dir"]), caption_extension=".txt",
                           class_tokens="", repeats=1, **BUCKETS, preview_images=2)
    masked = comfy.run_node("KilnMaskSource", dataset=files[0], mode="folder", mask_folder=str(data["mask_dir"]),
                            missing_mask_is_white=False, dilation=0, preview_images=2)
    for out in (mem, files, masked):
        preview = out[-1]
        assert preview.dim() == 4 and preview.shape[0] == 1 and preview.shape[-1] == 3
        assert out.ui["images"] and out.ui["images"][0]["type"] == "temp" and out.ui["text"]
    # the masked file dataset and the in-memory one show the same overlay (the text differs: repeats)
    tiles = 192 + 6
    assert torch.allclose(mem[-1][:, :tiles], masked[-1][:, :tiles], atol=2 / 255)
    # without masks the tiles are the plain training view (the overlay is what differs)
    assert (files[-1][:, :tiles] - masked[-1][:, :tiles]).abs().max() > 0.1

