"""Make Regularization Images in process on the tiny SD1 checkpoint: class images with captions and seeds in
kohya's reg-folder layout, reproducible, not generated again for the same model/prompt/count/seeds (only the new
ones for a larger count, again for another prompt's settings), and read by Load Dataset as regularization images."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from fixtures.kiln_nodes import DATASET

REG = dict(prompt="a photo of a toy", negative="", count=2, width=64, height=64, steps=2, cfg=5.0,
           sampler_name="euler", scheduler="normal", seed=11, folder="kiln_reg_test", repeats=1)


@pytest.fixture(scope="module")
def loaded(comfy, sd1_checkpoint):
    return comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)


def test_images_are_made_once_then_reused_extended_and_read_as_reg_images(comfy, loaded, dataset_dir):
    import folder_paths
    model, clip, vae = loaded
    out = comfy.run_node("KilnMakeRegImages", model=model, clip=clip, vae=vae, **REG)
    rel, images = out[0], out[1]
    target = os.path.join(folder_paths.get_input_directory(), rel, "1_a photo of a toy")
    assert rel == "kiln_reg_test" and sorted(os.listdir(target)) == [
        "00000.png", "00000.txt", "00001.png", "00001.txt", "kiln_generated.json"]
    assert images.shape == (2, 64, 64, 3)
    assert open(os.path.join(target, "00001.txt"), encoding="utf-8").read() == "a photo of a toy"
    with Image.open(os.path.join(target, "00001.png")) as im:
        assert "Seed: 12" in im.info["parameters"]
        first = np.asarray(im).copy()
    assert json.load(open(os.path.join(target, "kiln_generated.json")))["images"] == {"00000.png": 11, "00001.png": 12}
    stamps = {f: os.stat(os.path.join(target, f)).st_mtime_ns for f in os.listdir(target) if f.endswith(".png")}

    again = comfy.run_node("KilnMakeRegImages", model=model, clip=clip, vae=vae, **REG)
    assert "0 generated, 2 kept" in " ".join(map(str, again.ui["text"]))
    assert {f: os.stat(os.path.join(target, f)).st_mtime_ns for f in stamps} == stamps  # nothing written

    more = comfy.run_node("KilnMakeRegImages", model=model, clip=clip, vae=vae, **(REG | dict(count=3)))
    assert "1 generated, 2 kept" in " ".join(map(str, more.ui["text"]))
    os.remove(os.path.join(target, "00001.png"))
    redo = comfy.run_node("KilnMakeRegImages", model=model, clip=clip, vae=vae, **(REG | dict(count=3)))
    assert "1 generated" in " ".join(map(str, redo.ui["text"]))
    with Image.open(os.path.join(target, "00001.png")) as im:
        assert np.array_equal(np.asarray(im), first)  # the same seed gives the same image

    other = comfy.run_node("KilnMakeRegImages", model=model, clip=clip, vae=vae, **(REG | dict(cfg=3.0)))
    assert "2 generated, 0 kept, 1 removed beyond count" in " ".join(map(str, other.ui["text"]))
    assert not os.path.exists(os.path.join(target, "00002.png"))

    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **(DATASET | dict(
        regularization_folder=rel)))[0]
    reg = [i for i in ds.dataset.items if ds.dataset.subsets[i.subset].is_reg]
    assert len(reg) == 2 and all(i.caption == "a photo of a toy" for i in reg)


def test_a_folder_outside_the_input_folder_is_refused(comfy, loaded):
    model, clip, vae = loaded
    with pytest.raises(Exception) as err:
        comfy.run_node("KilnMakeRegImages", model=model, clip=clip, vae=vae, **(REG | dict(folder="../outside")))
    assert type(err.value).__name__ == "KilnError" and "outside ComfyUI's input folder" in str(err.value)
