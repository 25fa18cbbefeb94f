"""Memory options on real ComfyUI models, in process: blocks_to_swap (SD1 UNet layers, SD3 joint blocks) gives the
same LoRA gradient bit for bit as no swap, with and without gradient checkpointing, and leaves the model as it
was; gradient checkpointing really recomputes inside ComfyUI's UNet; the options are refused where they cannot
work, by name."""
from __future__ import annotations

import pytest
import torch

from test_train_sd1 import TRAIN, load_and_cache
from fixtures.kiln_nodes import lora_config
from test_train_sd3 import SD3_OPTS, sd3  # noqa: F401  (sd3: the module's loaded SD3 fixture)

ONE_SGD_STEP = {k: v for k, v in TRAIN.items() if k not in ("min_snr_gamma", "gradient_checkpointing")} | dict(
    steps=1, learning_rate=1.0, optimizer="SGD", max_grad_norm=0.0, precision="fp32", sample_every=0, sample_steps=1)


DDPM = {"KilnTrainSD1": dict(min_snr_gamma=0.0)}  # SD3 has no min_snr_gamma input


@pytest.fixture(scope="module")
def sd1(comfy, sd1_checkpoint, dataset_dir):
    return load_and_cache(comfy, sd1_checkpoint, dataset_dir)


def train(comfy, node, loaded, training_args="", checkpointing=False, **extra):
    """(LoRA tensors after one SGD step at lr 1 from lora_up = 0, i.e. minus the first gradient; the node's text)."""
    model, clip, cached = loaded
    out = comfy.run_node(node, model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                         **ONE_SGD_STEP, gradient_checkpointing=checkpointing, **DDPM.get(node, {}), **extra,
                         training_args=training_args)
    return out[1].state_dict, out.ui["text"][0]


def unet_layers(model) -> list:
    """What the UNet runs in order (the unit of swapping and checkpointing): its blocks' layers."""
    unet = model.model.diffusion_model
    return [layer for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks) for layer in block]


def weights(model) -> dict:
    return {n: (t, t.data_ptr(), t.clone()) for n, t in model.model.diffusion_model.state_dict(keep_vars=True).items()}


def assert_as_before(model, before) -> None:
    now = model.model.diffusion_model.state_dict(keep_vars=True)
    for n, (t, ptr, values) in before.items():
        assert now[n] is t and t.data_ptr() == ptr and torch.equal(t, values), n


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sd1_block_swap_gives_the_same_gradient_and_restores_the_unet(comfy, sd1, checkpointing):
    model = sd1[0]
    before = weights(model)
    plain, _ = train(comfy, "KilnTrainSD1", sd1, checkpointing=checkpointing)
    layers = len(unet_layers(model))
    swapped, text = train(comfy, "KilnTrainSD1", sd1, f"blocks_to_swap={layers - 2}", checkpointing)
    assert plain.keys() == swapped.keys() and all(torch.equal(plain[k], swapped[k]) for k in plain)
    assert any(bool(v.any()) for k, v in plain.items() if k.endswith("lora_up.weight"))
    assert f"blocks_to_swap {layers - 2}: {layers - 2} of {layers} blocks kept in host memory" in text
    assert_as_before(model, before)


def test_sd3_swapping_every_joint_block_gives_the_same_gradient(comfy, sd3):
    model = sd3[0]
    before = weights(model)
    count = len(model.model.diffusion_model.joint_blocks)
    plain, _ = train(comfy, "KilnTrainSD3", sd3, **SD3_OPTS)
    swapped, text = train(comfy, "KilnTrainSD3", sd3, f"blocks_to_swap={count}", True, **SD3_OPTS)
    assert plain.keys() == swapped.keys() and all(torch.equal(plain[k], swapped[k]) for k in plain)
    assert f"{count} of {count} blocks kept in host memory" in text
    assert_as_before(model, before)
    with pytest.raises(Exception, match=f"blocks_to_swap={count + 1}: this model has {count} blocks"):
        train(comfy, "KilnTrainSD3", sd3, f"blocks_to_swap={count + 1}", **SD3_OPTS)


def test_gradient_checkpointing_recomputes_inside_comfyuis_unet(comfy, sd1):
    """ComfyUI's UNet runs each block's layers itself (never the block's forward), so checkpointing must wrap the
    layers: with it on, a layer inside a ResBlock runs once more per training step (its recompute)."""
    layers = unet_layers(sd1[0])
    first_lora = next(k for k, m in enumerate(layers) if type(m).__name__ == "SpatialTransformer")
    # a ResBlock after the first LoRA'd transformer: its input needs a gradient, so its backward runs
    inner = next(m for m in layers[first_lora:] if type(m).__name__ == "ResBlock").in_layers[0]
    calls = []
    handle = inner.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    try:
        train(comfy, "KilnTrainSD1", sd1)
        plain = len(calls)
        calls.clear()
        train(comfy, "KilnTrainSD1", sd1, checkpointing=True)
    finally:
        handle.remove()
    assert len(calls) == plain + 1


def test_cpu_offload_checkpointing_trains_the_same_and_refusals_name_the_option(comfy, sd1):
    plain, _ = train(comfy, "KilnTrainSD1", sd1, checkpointing=True)
    offloaded, _ = train(comfy, "KilnTrainSD1", sd1, "cpu_offload_checkpointing=true", True)
    assert all(torch.equal(plain[k], offloaded[k]) for k in plain)
    with pytest.raises(Exception, match="blocks_to_swap and cpu_offload_checkpointing cannot be combined"):
        train(comfy, "KilnTrainSD1", sd1, "blocks_to_swap=2 cpu_offload_checkpointing=true", True)
    with pytest.raises(Exception, match="cpu_offload_checkpointing needs gradient_checkpointing"):
        train(comfy, "KilnTrainSD1", sd1, "cpu_offload_checkpointing=true")
    model, clip, cached = sd1
    with pytest.raises(Exception, match="blocks_to_swap moves frozen weights"):
        comfy.run_node("KilnTrainDreamBooth", model=model, clip=clip, dataset=cached,
                       **ONE_SGD_STEP, min_snr_gamma=0.0, gradient_checkpointing=False, training_args="blocks_to_swap=1")
