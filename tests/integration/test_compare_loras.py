"""Compare LoRAs in process on the tiny SD1 checkpoint: a run's intermediate LoRAs and its final one at two
strengths under the base model, in one labelled grid; each cell is what stock LoraLoader + KSampler + VAEDecode
give; the step with the lowest validation loss is named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.kiln_nodes import DATASET
from test_train_sd1 import TRAIN

SAMPLE = dict(prompt="a kiln toy", negative="", seed=5, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
              width=64, height=64)


@pytest.fixture(scope="module")
def loaded(comfy, sd1_checkpoint):
    return comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)


def cell(grid: torch.Tensor, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """A cell of the grid: the label band is on top and on the left, cells are 64 px."""
    h, w = grid.shape[1], grid.shape[2]
    top, left = h - rows * 64, w - cols * 64
    return (grid[0, top + row * 64: top + (row + 1) * 64, left + col * 64: left + (col + 1) * 64].numpy() * 255).round()


@pytest.mark.slow
def test_grid_of_steps_and_strengths_matches_stock_lora_loader(comfy, loaded, dataset_dir):
    model, clip, vae = loaded
    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **DATASET)[0]
    cached = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    cfg = comfy.run_node("KilnLoraConfig", rank=4, alpha=4.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    trained = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=cfg,
                             **(TRAIN | dict(steps=4, sample_every=0, sample_steps=1, learning_rate=5e-3)),
                             save_every_n_steps=2, save_name="kiln/compare_test",
                             training_args="validation_split=0.3 validate_every_n_steps=2")
    out = comfy.run_node("KilnCompareLoras", model=model, clip=clip, vae=vae, save_name="kiln/compare_test",
                         strengths="0.5, 1.0", lora=trained[1], **SAMPLE)
    grid = out[0]
    text = " ".join(map(str, out.ui["text"]))
    assert grid.shape[0] == 1 and grid.shape[1] > 3 * 64 and grid.shape[2] > 2 * 64
    assert "2 LoRAs × 2 strengths + base" in text and "lowest validation loss" in text
    base = comfy.run_node("KSampler", model=model, seed=5, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                          positive=comfy.run_node("CLIPTextEncode", clip=clip, text="a kiln toy")[0],
                          negative=comfy.run_node("CLIPTextEncode", clip=clip, text="")[0],
                          latent_image=comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0],
                          denoise=1.0)[0]
    m, c = comfy.run_node("LoraLoader", model=model, clip=clip, lora_name="kiln/compare_test-step00000002.safetensors",
                          strength_model=1.0, strength_clip=1.0)
    stock = comfy.run_node("KSampler", model=m, seed=5, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                           positive=comfy.run_node("CLIPTextEncode", clip=c, text="a kiln toy")[0],
                           negative=comfy.run_node("CLIPTextEncode", clip=c, text="")[0],
                           latent_image=comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0],
                           denoise=1.0)[0]
    decode = lambda latent: (comfy.run_node("VAEDecode", samples=latent, vae=vae)[0][0].numpy() * 255).round()
    assert np.abs(cell(grid, 0, 0, 3, 2) - decode(base)).max() <= 1  # the base row
    assert np.abs(cell(grid, 1, 1, 3, 2) - decode(stock)).max() <= 1  # step 2 at strength 1.0, as Load LoRA gives it
    assert np.abs(cell(grid, 1, 1, 3, 2) - cell(grid, 0, 0, 3, 2)).mean() > 0.5  # the LoRA changes the image
    label_band = grid[0, :, : grid.shape[2] - 2 * 64].numpy()
    assert label_band.std() > 0.01  # row labels drawn


@pytest.mark.slow  # compares the LoRA the grid test (slow) wrote, so it runs in the lane that runs that test
def test_a_list_of_loras_is_compared_in_its_order(comfy, loaded):
    model, clip, vae = loaded
    out = comfy.run_node("KilnCompareLoras", model=model, clip=clip, vae=vae, save_name="kiln/unused",
                         strengths="1.0", loras="kiln/compare_test-step00000002.safetensors\n", **SAMPLE)
    assert out[0].shape[1] == 24 + 2 * 64  # base + the listed LoRA
    assert "1 LoRAs × 1 strengths + base" in " ".join(map(str, out.ui["text"]))
    with pytest.raises(Exception) as err:
        comfy.run_node("KilnCompareLoras", model=model, clip=clip, vae=vae, save_name="", strengths="1.0",
                       loras="kiln/nope.safetensors", **SAMPLE)
    assert type(err.value).__name__ == "KilnError" and "not a file in models/loras" in str(err.value)


def test_nothing_to_compare_is_refused(comfy, loaded):
    model, clip, vae = loaded
    with pytest.raises(Exception) as err:
        comfy.run_node("KilnCompareLoras", model=model, clip=clip, vae=vae, save_name="kiln/no_such_run",
                       strengths="1.0", **SAMPLE)
    assert type(err.value).__name__ == "KilnError" and "no LoRAs to compare" in str(err.value)
