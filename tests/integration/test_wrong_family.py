"""A model wired into the wrong Train node is refused up front, with a message that names the family it got
and the node to use instead (nodes/comfy/model.require_family), before anything is loaded or trained.

There is no SDXL case: no SDXL fixture exists (CLIP-G alone is 1.39 GB fp16; see tests/fixtures/tiny_models.py).
"""
from __future__ import annotations

import pytest

from fixtures.kiln_nodes import DATASET, kiln_error
from test_errors_and_cancel import TRAIN


@pytest.fixture(scope="module")
def sd1_parts(comfy, sd1_checkpoint, dataset_dir):
    """SD1 CLIP, a dataset with latents cached by the SD1 VAE, and a LoRA config: everything but the MODEL."""
    _model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **DATASET)[0]
    ds = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    cfg = comfy.run_node("KilnLoraConfig", rank=2, alpha=2.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    return dict(clip=clip, dataset=ds, lora_config=cfg)


def test_sd3_model_into_train_sd1_names_the_family_and_the_right_node(comfy, sd3_checkpoint, sd1_parts):
    model, _clip, _vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd3_checkpoint)
    assert type(model.model.model_config).__name__ == "SD3"
    net = model.model.diffusion_model
    params = {n: p for n, p in net.named_parameters()}

    with pytest.raises(Exception) as e:
        comfy.run_node("KilnTrainSD1", model=model, **sd1_parts, steps=2, **TRAIN)
    message = kiln_error(e)
    assert "SD3" in message and "Train LoRA (SD3)" in message, message
    assert "Train LoRA (SD1)" in message, message  # which node refused it

    # Refused before any training: no step reported, no loss sent, the shared MODEL untouched.
    assert comfy.progress == [], comfy.progress
    assert not [ev for ev, _ in comfy.events if ev.startswith("kiln.")], comfy.events
    assert all(p is params[n] and p.is_inference() for n, p in net.named_parameters())
    assert not any("forward" in m.__dict__ for m in net.modules())  # no LoRA hooked in
    assert not model.patches
