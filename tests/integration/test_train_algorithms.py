"""LoHa, LoKr and DoRA train on each family's fixture (2 steps), write LyCORIS keys that ComfyUI's own LoRA loader
maps in full, and the MODEL output carries them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("lycoris.functional")

from fixtures.kiln_nodes import comfy_model
from test_train_sd1 import TRAIN, ksample, load_and_cache
from test_train_sd3 import SD3_OPTS

ALGOS = {"loha": {}, "lokr": {"factor": 4}, "dora": {}}
KEYS = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"}}
OPTS = TRAIN | dict(steps=2, learning_rate=1e-2, sample_every=0, sample_steps=1, precision="fp32")


def config(comfy, algorithm, conv_rank=0, **kw):
    return comfy.run_node("KilnLoraConfig", rank=4, alpha=4.0, conv_rank=conv_rank, conv_alpha=1.0, dropout=0.0,
                          rank_dropout=0.0, module_dropout=0.0, algorithm=algorithm, **(ALGOS[algorithm] | kw))[0]


def check_lora(comfy, model, clip, lora, algorithm):
    sd, meta = lora.state_dict, lora.metadata
    suffixes = {k.split(".", 1)[1] for k in sd}
    if algorithm == "lokr":  # small layers get a full w2 (LyCORIS's rule), the rest a low-rank one
        assert {"lokr_w1", "alpha"} <= suffixes <= KEYS["lokr"] | {"lokr_w2"}
    else:
        assert suffixes == KEYS[algorithm]
    assert comfy_model(comfy).unmapped_lora_keys(model, sd, clip) == []
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert '"algo": "%s"' % {"dora": "locon"}.get(algorithm, algorithm) in meta["ss_network_args"]
    assert all(torch.isfinite(v).all() for v in sd.values())


@pytest.fixture(scope="module")
def sd1(comfy, sd1_checkpoint, dataset_dir):
    return load_and_cache(comfy, sd1_checkpoint, dataset_dir)


# the fast lane trains one algorithm through the node (the others' maths are unit-tested in test_lycoris_algos.py)
@pytest.mark.parametrize("algorithm", [a if a == "loha" else pytest.param(a, marks=pytest.mark.slow) for a in ALGOS])
def test_sd1_every_algorithm_on_linear_conv_and_text_encoder(comfy, sd1, algorithm):
    model, clip, cached = sd1
    before = ksample(comfy, model, clip)
    out = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached,
                         lora_config=config(comfy, algorithm, conv_rank=2), **OPTS, text_encoder_lr=1e-3)
    model_out, lora, _, _, clip_out = out
    check_lora(comfy, model, clip, lora, algorithm)
    names = {k.split(".")[0] for k in lora.state_dict}
    assert any("resnets_0_conv1" in n for n in names) and any(n.startswith("lora_te_") for n in names)
    assert "LoKr" in out.ui["text"][0] if algorithm == "lokr" else True
    # ComfyUI's own patching (what Load LoRA does) applied the file: samples change; the input model did not
    assert not torch.equal(ksample(comfy, model_out, clip_out), before)
    assert torch.equal(ksample(comfy, model, clip), before)


@pytest.fixture(scope="module")
def sdxl(comfy, sdxl_checkpoint, dataset_dir):
    return load_and_cache(comfy, sdxl_checkpoint, dataset_dir)


@pytest.fixture(scope="module")
def sd3(comfy, sd3_checkpoint, dataset_dir):
    return load_and_cache(comfy, sd3_checkpoint, dataset_dir)


# LoKr on SDXL is not trained here: tests/e2e/test_family_workflows.py trains it from the sdxl_lokr example
# workflow and asserts what check_lora asserts (keys of every module, every key applied by ComfyUI's loader,
# ss_network_module and algo, finite values)
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [a for a in ALGOS if a != "lokr"])
def test_sdxl_every_algorithm(comfy, sdxl, algorithm):
    model, clip, cached = sdxl
    lora = comfy.run_node("KilnTrainSDXL", model=model, clip=clip, dataset=cached,
                          lora_config=config(comfy, algorithm, conv_rank=2), **OPTS)[1]
    check_lora(comfy, model, clip, lora, algorithm)


@pytest.mark.parametrize("algorithm", list(ALGOS))
def test_sd3_every_algorithm_with_per_layer_ranks(comfy, sd3, algorithm):
    model, clip, cached = sd3
    cfg = config(comfy, algorithm, network_args="x_mlp_dim=2 context_attn_dim=0 emb_dims=[0,0,2,0,0,0]")
    opts = {k: v for k, v in OPTS.items() if k != "min_snr_gamma"}
    lora = comfy.run_node("KilnTrainSD3", model=model, clip=clip, dataset=cached, lora_config=cfg, **opts,
                          **SD3_OPTS)[1]
    check_lora(comfy, model, clip, lora, algorithm)
    names = {k.split(".")[0] for k in lora.state_dict}
    assert any("x_block_mlp_fc1" in n for n in names) and not any("context_block_attn" in n for n in names)
    assert "lora_unet_x_embedder_proj" in names  # the patch-embedding conv, through emb_dims


def test_sd1_block_dims_lr_weights_loraplus_and_verbose_table(comfy, sd1):
    model, clip, cached = sd1
    dims = [4] * 12 + [6] + [2] * 12
    args = (f"block_dims={','.join(map(str, dims))} down_lr_weight=zeros mid_lr_weight=2 up_lr_weight=sine+.5 "
            f"conv_block_dims={','.join(['3'] * 25)} loraplus_lr_ratio=16 verbose=True")
    cfg = comfy.run_node("KilnLoraConfig", rank=8, alpha=8.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0, network_args=args)[0]
    out = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=cfg,
                         **(OPTS | dict(steps=1)))
    sd, text = out[1].state_dict, out.ui["text"][0]
    ranks = {k.split(".")[0]: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert not any("down_blocks" in n for n in ranks)  # down_lr_weight=zeros: no LoRA there at all (kohya)
    assert {r for n, r in ranks.items() if "mid_block" in n and not n.endswith(("conv1", "conv2"))} == {6}
    assert {r for n, r in ranks.items() if "up_blocks" in n and n.endswith(("conv1", "conv2"))} == {3}
    assert {r for n, r in ranks.items() if "up_blocks" in n and "attentions" in n} == {2}
    assert comfy_model(comfy).unmapped_lora_keys(model, sd) == []
    assert "block  where" in text and "mid_block" in text and "(×2)" in text and "(×0)" in text
