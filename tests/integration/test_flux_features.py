"""What Kiln has for every family, on the tiny FLUX.1 dev (Train LoRA (Flux), in process): masked loss, regularization
images with prior_loss_weight, bit-identical resume, EMA, the validation loss, LoHa / LoKr / DoRA files that ComfyUI's
stock Load LoRA applies in full, blocks_to_swap split over double and single blocks as kohya's, and an fp8 base.

One Flux model, CLIP-L and VAE are loaded for the module; runs are one SGD step where a gradient is the evidence and a
few steps where a curve is (test_train_flux.py says what the fixtures cover of the text side)."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.datasets import make_dataset
from fixtures.kiln_nodes import DATASET, comfy_model, kiln_error, lora_config
from test_train_flux import FLUX_OPTS, FLUX_TRAIN

# one plain SGD step at learning rate 1 from lora_up = 0: lora_up then holds minus the first gradient
ONE_SGD_STEP = FLUX_TRAIN | dict(steps=1, learning_rate=1.0, optimizer="SGD", max_grad_norm=0.0, precision="fp32")


@pytest.fixture(scope="module")
def parts(comfy, flux_model_name, sd1_checkpoint, sd3_checkpoint):
    """(MODEL, CLIP, VAE): the tiny FLUX.1 dev by Load Diffusion Model, the SD1 fixture's CLIP-L, the SD3 VAE."""
    model = comfy.run_node("UNETLoader", unet_name=flux_model_name("flux-dev"), weight_dtype="default")[0]
    clip = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)[1]
    vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd3_checkpoint)[2]
    return model, clip, vae


def cache(comfy, vae, folder, masks: str = "", **dataset):
    ds = comfy.run_node("KilnLoadDataset", folder=str(folder), **(DATASET | dict(batch_size=1) | dataset))[0]
    if masks:
        ds = comfy.run_node("KilnMaskSource", dataset=ds, mode="folder", mask_folder=masks,
                            missing_mask_is_white=False, dilation=0)[0]
    return comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]


@pytest.fixture(scope="module")
def cached(comfy, parts, dataset_dir):
    return cache(comfy, parts[2], dataset_dir["train_dir"])


def train(comfy, parts, dataset, config=None, **opts):
    model, clip, _ = parts
    return comfy.run_node("KilnTrainFlux", model=model, clip=clip, dataset=dataset,
                          lora_config=config or lora_config(comfy), **(FLUX_TRAIN | opts), **FLUX_OPTS)


def ups(lora) -> dict[str, torch.Tensor]:
    return {k: v for k, v in lora.state_dict.items() if k.endswith("lora_up.weight")}


def text(out) -> str:
    return " ".join(map(str, out.ui["text"]))


def test_masked_loss_reaches_the_prediction_only_where_the_mask_is(comfy, parts, tmp_path):
    """Masks whose left half is black: the gradient of the loss with respect to the Flux network's output is
    exactly zero over the masked-out latent columns and non-zero over the rest."""
    data = make_dataset(tmp_path / "masked", count=2)
    masks = tmp_path / "left_black"
    masks.mkdir()
    for image in data["images"]:
        w, h = Image.open(image).size
        m = np.full((h, w), 255, np.uint8)
        m[:, : w // 2] = 0
        Image.fromarray(m, "L").save(masks / f"{image.stem}.png")
    dataset = cache(comfy, parts[2], data["train_dir"], masks=str(masks))
    net = parts[0].model.diffusion_model
    grads = []

    def keep_output_grad(module, args, output):
        if torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(lambda g: grads.append(g.detach().clone()))
    handle = net.register_forward_hook(keep_output_grad)
    try:
        train(comfy, parts, dataset, **ONE_SGD_STEP)
    finally:
        handle.remove()
    assert len(grads) == 1
    for g in grads:  # (1, 16, h, w): the network's output in latent space
        w = g.shape[-1]
        assert torch.count_nonzero(g[..., : w // 2]) == 0
        assert torch.count_nonzero(g[..., w // 2:]) > 0.9 * g[..., w // 2:].numel()


@pytest.fixture(scope="module")
def with_reg(comfy, parts, dataset_dir, tmp_path_factory):
    """One training image and one regularization image of the same size: an epoch is one batch of both."""
    root = tmp_path_factory.mktemp("flux_reg")
    image = next(p for p in dataset_dir["images"] if Image.open(p).size == (64, 64))
    other = next(p for p in dataset_dir["images"] if Image.open(p).size == (64, 64) and p != image)
    (root / "train" / "1_kiln toy").mkdir(parents=True)
    (root / "reg" / "1_toy").mkdir(parents=True)
    shutil.copy(image, root / "train" / "1_kiln toy" / image.name)
    shutil.copy(other, root / "reg" / "1_toy" / other.name)
    return cache(comfy, parts[2], root / "train", batch_size=2, regularization_folder=str(root / "reg"))


@pytest.mark.slow
def test_prior_loss_weight_scales_the_regularization_images_share_of_the_gradient(comfy, parts, with_reg):
    """One step over a batch of a training and a regularization image: the gradient is g_train + w·g_reg, so it
    moves with prior_loss_weight w, linearly (w = 0, 1, 2)."""
    g = [ups(train(comfy, parts, with_reg, **(ONE_SGD_STEP | dict(prior_loss_weight=w)))[1]) for w in (0.0, 1.0, 2.0)]
    assert g[0].keys() == g[1].keys() and len(g[0]) > 10
    first, second = (torch.cat([(b[k] - a[k]).flatten() for k in sorted(a)]) for a, b in ((g[0], g[1]), (g[1], g[2])))
    assert float(first.norm()) > 1e-3 * float(torch.cat([v.flatten() for v in g[1].values()]).norm())
    assert float((first - second).norm()) <= 1e-4 * float(first.norm())


@pytest.mark.slow
def test_resume_from_a_step_save_ends_bit_identical(comfy, parts, cached):
    opts = dict(steps=4, lr_scheduler="cosine", save_every_n_steps=2, save_name="kiln/flux_resume")
    full = train(comfy, parts, cached, **opts)[1]
    saved = comfy.loras_dir / "kiln" / "flux_resume-step00000002.safetensors"
    assert saved.is_file() and saved.with_suffix(".kiln-state").is_file()
    out = train(comfy, parts, cached, **opts, resume_from="kiln/flux_resume-step00000002.safetensors")
    assert "resuming exactly at step 2" in text(out)
    resumed = out[1].state_dict
    assert full.state_dict.keys() == resumed.keys()
    assert all(torch.equal(full.state_dict[k], resumed[k]) for k in resumed)


@pytest.mark.slow
def test_validation_loss_and_ema(comfy, parts, cached):
    """validation_split holds images out and reports their loss every step; ema_decay on top changes only what the
    node outputs (the average), recorded as kiln_ema_decay."""
    import json
    args = "validation_split=0.3 validate_every_n_steps=1"
    comfy.events.clear()
    plain = train(comfy, parts, cached, steps=2, training_args=args)
    meta = plain[1].metadata
    curve = json.loads(meta["kiln_validation_loss"])
    assert [step for step, _ in curve] == [1, 2] and all(np.isfinite(v) and v > 0 for _, v in curve)
    assert int(meta["ss_num_validation_images"]) > 0 and "validation loss" in text(plain)
    assert [d["step"] for e, d in comfy.events if e == "kiln.loss" and d.get("val_loss") is not None] == [1, 2]
    ema = train(comfy, parts, cached, steps=2, training_args=args + " ema_decay=0.5")[1]
    assert ema.metadata["kiln_ema_decay"] == "0.5"
    assert json.loads(ema.metadata["kiln_validation_loss"])  # measured with the average too
    assert ema.state_dict.keys() == plain[1].state_dict.keys()
    assert any(not torch.equal(ema.state_dict[k], plain[1].state_dict[k]) for k in ema.state_dict)


ALGOS = {"loha": ({}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
         "lokr": ({"factor": 4}, {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}),
         "dora": ({}, {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"})}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGOS))
def test_lycoris_algorithms_on_flux_load_in_stock_load_lora(comfy, parts, cached, algorithm, caplog):
    pytest.importorskip("lycoris.functional")
    model, clip, _ = parts
    extra, keys = ALGOS[algorithm]
    config = comfy.run_node("KilnLoraConfig", rank=4, alpha=4.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                            rank_dropout=0.0, module_dropout=0.0, algorithm=algorithm, **extra)[0]
    lora = train(comfy, parts, cached, config, steps=1)[1]
    sd = lora.state_dict
    names = {k.split(".")[0] for k in sd}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_0_linear1" in names
    assert {k.split(".", 1)[1] for k in sd} <= keys and all(torch.isfinite(v).all() for v in sd.values())
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert comfy_model(comfy).unmapped_lora_keys(model, sd, clip) == []
    name = f"kiln/flux_{algorithm}"
    comfy.run_node("KilnSaveLora", lora=lora, filename=name, precision="fp32", overwrite=True)
    with caplog.at_level(logging.WARNING):
        loaded = comfy.run_node("LoraLoader", model=model, clip=clip, lora_name=name + ".safetensors",
                                strength_model=1.0, strength_clip=1.0)[0]
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == len(names)  # one patched weight per module in the file


@pytest.mark.slow
def test_block_swap_splits_as_kohya_and_gives_the_same_gradient(comfy, parts, cached):
    """kohya's split of blocks_to_swap N: N // 2 double blocks and 2·(N − N // 2) single blocks, the last of each
    kind (capped at the fixture's one of each: 1 swaps the single block, 2 both). The LoRA gradient equals the one
    without swap, bit for bit, also with gradient checkpointing (Flux's blocks add residuals into their inputs in
    place, which the checkpoint keeps for the recompute), and the model's weights are the same tensors afterwards."""
    net = parts[0].model.diffusion_model
    before = {n: (t, t.data_ptr(), t.clone()) for n, t in net.state_dict(keep_vars=True).items()}
    plain = ups(train(comfy, parts, cached, **ONE_SGD_STEP)[1])
    assert any(bool(v.any()) for v in plain.values())
    for count, checkpointing in ((1, False), (2, True)):
        out = train(comfy, parts, cached, **(ONE_SGD_STEP | dict(gradient_checkpointing=checkpointing)),
                    training_args=f"blocks_to_swap={count}")
        swapped = ups(out[1])
        assert swapped.keys() == plain.keys() and all(torch.equal(plain[k], swapped[k]) for k in plain)
        assert f"blocks_to_swap {count}: {count} of 2 blocks kept in host memory" in text(out)
    now = net.state_dict(keep_vars=True)
    for n, (t, ptr, values) in before.items():
        assert now[n] is t and t.data_ptr() == ptr and torch.equal(t, values), n


@pytest.mark.slow
def test_fp8_base_trains_and_the_fp8_weights_stay_untouched(comfy, parts, cached, flux_model_name):
    """Load Diffusion Model in fp8_e4m3fn with training_args fp8_base: the loss is finite and falls, the fp8 weights
    are the same bytes afterwards."""
    fp8 = comfy.run_node("UNETLoader", unet_name=flux_model_name("flux-dev"), weight_dtype="fp8_e4m3fn")[0]
    weights = {n: p for n, p in fp8.model.diffusion_model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert len(weights) > 10
    before = {n: p.view(torch.uint8).clone() for n, p in weights.items()}
    out = train(comfy, (fp8, parts[1], parts[2]), cached, training_args="fp8_base=true")
    meta = out[1].metadata
    start, end = float(meta["kiln_probe_loss_start"]), float(meta["kiln_probe_loss_end"])
    assert np.isfinite(start) and np.isfinite(end) and end < start
    assert meta["ss_fp8_base"] == "True"
    assert all(torch.equal(p.view(torch.uint8), before[n]) for n, p in weights.items())
    with pytest.raises(Exception) as err:  # fp8_base asks for what only the loader can give
        train(comfy, parts, cached, steps=1, training_args="fp8_base=true")
    assert "fp8_base" in kiln_error(err)
