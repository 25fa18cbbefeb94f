"""Train SD3 in process on the tiny SD3 checkpoint (MMDiT + CLIP-L) that ComfyUI's loader detects as SD3."""
from __future__ import annotations

import re

import pytest

from fixtures.kiln_nodes import comfy_model, lora_config
from test_train_sd1 import TRAIN, load_and_cache

SD3_OPTS = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, training_shift=1.0,
                t5xxl_max_token_length=256, apply_lg_attn_mask=False, apply_t5_attn_mask=False, clip_l_dropout_rate=0.0,
                clip_g_dropout_rate=0.0, t5_dropout_rate=0.0, pos_emb_random_crop_rate=0.0)
SD3_TRAIN = {k: v for k, v in TRAIN.items() if k != "min_snr_gamma"} | dict(steps=25, learning_rate=3e-3)


@pytest.fixture(scope="module")
def sd3(comfy, sd3_checkpoint, dataset_dir):
    return load_and_cache(comfy, sd3_checkpoint, dataset_dir)


@pytest.mark.slow
def test_sd3_lora_trains_maps_and_restores_the_model(comfy, sd3):
    model, clip, cached = sd3
    mmdit = model.model.diffusion_model
    before = {n: (p, p.data_ptr()) for n, p in mmdit.named_parameters()}
    out = comfy.run_node("KilnTrainSD3", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy),
                         **SD3_TRAIN, **SD3_OPTS)
    model_out, lora, samples, plot, _clip = out
    meta = lora.metadata
    assert float(meta["kiln_probe_loss_end"]) < 0.9 * float(meta["kiln_probe_loss_start"])
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    # kohya's names for SD3: networks.lora_sd3 and the model type (medium / 5-medium / 5-large)
    assert (meta["ss_network_module"], meta["ss_base_model_version"]) == ("networks.lora_sd3", "medium")
    names = {k.split(".")[0] for k in lora.state_dict}
    # default targets, as kohya's lora_sd3: every Linear of both streams (attention qkv/proj, MLP, adaLN modulation)
    # of every joint block at the LoRA rank; nothing outside the joint blocks
    want = {"lora_unet_" + n.replace(".", "_") for n, m in mmdit.named_modules()
            if re.fullmatch(r"joint_blocks\.\d+\.(context|x)_block\.(attn\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)", n)}
    assert names == want and any("_mlp_fc1" in n for n in names) and any("adaLN_modulation" in n for n in names)
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in names  # the last context block has none
    assert comfy_model(comfy).unmapped_lora_keys(model, lora.state_dict) == []
    now = dict(mmdit.named_parameters())
    assert all(now[n] is p and p.data_ptr() == ptr for n, (p, ptr) in before.items())
    assert not any("forward" in m.__dict__ or "cropped_pos_embed" in m.__dict__ for m in mmdit.modules())
    assert samples.shape == (1, 64, 64, 3) and model_out is not model


@pytest.mark.slow
def test_sd3_per_layer_ranks_embedders_and_block_selection(comfy, sd3):
    model, clip, cached = sd3
    args = "context_attn_dim=0 x_attn_dim=2 x_mlp_dim=3 x_mod_dim=1 emb_dims=[0,5,6,0,0,7] train_block_indices=1 verbose=True"
    opts = SD3_OPTS | dict(weighting_scheme="mode", apply_lg_attn_mask=True, clip_l_dropout_rate=0.5,
                           pos_emb_random_crop_rate=0.5)
    out = comfy.run_node("KilnTrainSD3", model=model, clip=clip, dataset=cached, lora_config=lora_config(comfy, args),
                         **(SD3_TRAIN | dict(steps=3)), **opts, text_encoder_lr1=1e-4, text_encoder_lr2=1e-4)
    sd = out[1].state_dict
    te1 = {k.split(".")[0] for k in sd if k.startswith("lora_te1_text_model_encoder_layers_")}
    assert len(te1) == 6 * len(clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers)
    assert not any(k.startswith(("lora_te2_", "lora_te3_")) for k in sd)  # the fixture's CLIP has only CLIP-L
    ranks = {k.split(".")[0]: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")
             and k.startswith("lora_unet_")}
    assert ranks == {
        "lora_unet_joint_blocks_1_x_block_attn_qkv": 2, "lora_unet_joint_blocks_1_x_block_attn_proj": 2,
        "lora_unet_joint_blocks_1_x_block_mlp_fc1": 3, "lora_unet_joint_blocks_1_x_block_mlp_fc2": 3,
        "lora_unet_joint_blocks_1_x_block_adaLN_modulation_1": 1,
        "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1": 4,  # context_mod_dim not given: the LoRA rank
        "lora_unet_t_embedder_mlp_0": 5, "lora_unet_t_embedder_mlp_2": 5, "lora_unet_x_embedder_proj": 6,
        "lora_unet_final_layer_linear": 7}
    assert comfy_model(comfy).unmapped_lora_keys(model, sd, clip) == []
    text = " ".join(map(str, out.ui["text"]))  # the verbose listing is shown on the node
    assert f"{10 + len(te1)} LoRA modules (unet 10, clip_l {len(te1)})" in text
    assert re.search(r"lora_unet_x_embedder_proj +rank 6, alpha 4", text)
    assert "clip_g is not in this CLIP" in text
    meta = out[1].metadata  # what kohya's sd3_train_network adds to train_network's keys
    assert (meta["ss_weighting_scheme"], meta["ss_apply_lg_attn_mask"], meta["ss_apply_t5_attn_mask"]) == \
        ("mode", "True", "False")
    assert (meta["ss_logit_mean"], meta["ss_logit_std"], meta["ss_mode_scale"]) == \
        tuple(str(float(SD3_OPTS[k])) for k in ("logit_mean", "logit_std", "mode_scale"))


def test_sd3_node_refuses_keys_it_does_not_read(comfy, sd3):
    model, clip, cached = sd3
    with pytest.raises(Exception) as err:
        comfy.run_node("KilnTrainSD3", model=model, clip=clip, dataset=cached,
                       lora_config=lora_config(comfy, "x_atn_dim=4"), **(SD3_TRAIN | dict(steps=1)), **SD3_OPTS)
    assert type(err.value).__name__ == "KilnError" and "x_atn_dim" in str(err.value) and "x_attn_dim" in str(err.value)


@pytest.mark.slow  # loads the SD3 fixture
def test_pos_emb_random_crop_rate_draws_kohyas_crops(comfy, sd3_checkpoint):
    """kohya's pos_emb_random_crop_rate p: in a training forward, with probability p the position embedding is cut
    from a uniformly drawn place of the max-size grid instead of its centre; never without gradients (probe,
    previews); ComfyUI's method is back afterwards."""
    import torch
    model = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd3_checkpoint)[0]
    mmdit = model.model.diffusion_model
    size, p = mmdit.pos_embed_max_size, mmdit.x_embedder.patch_size[0]
    grid = mmdit.pos_embed.reshape(size, size, -1)
    hw, n = (8 * p, 8 * p), 8  # 8×8 patches

    def place(embed):
        found = (grid == embed[0, 0]).all(-1).nonzero()
        assert len(found) == 1
        top, left = found[0].tolist()
        assert torch.equal(embed[0], grid[top:top + n, left:left + n].reshape(n * n, -1))  # a crop, unchanged
        return top, left

    centre = place(mmdit.cropped_pos_embed(hw))
    assert centre == ((size - n) // 2,) * 2
    with torch.inference_mode(False), comfy.pack_module("nodes.comfy.model").random_pos_embed_crop(mmdit, 0.3, 1):
        with torch.enable_grad():
            places = [place(mmdit.cropped_pos_embed(hw)) for _ in range(1000)]
        with torch.no_grad():
            assert place(mmdit.cropped_pos_embed(hw)) == centre
    assert "cropped_pos_embed" not in mmdit.__dict__ and place(mmdit.cropped_pos_embed(hw)) == centre
    moved = [pl for pl in places if pl != centre]
    assert abs(len(moved) / 1000 - 0.3) < 0.06
    tops, lefts = [t for t, _ in moved], [left for _, left in moved]
    span = size - n  # offsets 0 .. size - n, uniform
    for values in (tops, lefts):
        assert min(values) < span / 4 and max(values) > 3 * span / 4
        assert abs(sum(values) / len(values) - span / 2) < span / 8
