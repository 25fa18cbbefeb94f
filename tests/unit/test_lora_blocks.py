"""kohya's block-wise LoRA settings and LoRA+ (networks/lora.py, docs/train_network_README: 階層別学習率 /
階層別dim), checked against the published rules computed here by hand."""
import math

import pytest
import torch
from torch import nn

from trainer_core.errors import KilnError
from trainer_core.lora.blocks import block_index, block_lr_weights, block_name, block_plan, loraplus_ratios, preset
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule


def sine(n):
    return [math.sin(math.pi / 2 * i / (n - 1)) for i in range(n)]


@pytest.mark.parametrize("n", [12, 9])
def test_presets_are_kohyas_curves(n):
    assert preset("sine", n) == pytest.approx(sine(n))
    assert preset("cosine", n) == pytest.approx(sine(n)[::-1])
    assert preset("linear", n) == pytest.approx([i / (n - 1) for i in range(n)])
    assert preset("reverse_linear", n) == pytest.approx([(n - 1 - i) / (n - 1) for i in range(n)])
    assert preset("zeros", n) == [0.0] * n
    assert preset("cosine+.25", n) == pytest.approx([v + 0.25 for v in sine(n)[::-1]])  # "0.25~1.25" in the docs
    assert preset("cosine+.25", n)[0] == pytest.approx(1.25) and preset("cosine+.25", n)[-1] == pytest.approx(0.25)
    with pytest.raises(KilnError, match="unknown lr weight preset 'wave'"):
        preset("wave", n)


def test_sd1_docs_example_with_threshold():
    # the docs' example: block_lr_zero_threshold=0.1 down_lr_weight=sine+.5 mid_lr_weight=1.5 up_lr_weight=cosine+.5
    w = block_lr_weights({"block_lr_zero_threshold": "0.1", "down_lr_weight": "sine+.5", "mid_lr_weight": "1.5",
                          "up_lr_weight": "cosine+.5"}, is_sdxl=False)
    assert len(w) == 25
    assert w[:12] == pytest.approx([v + 0.5 for v in sine(12)])
    assert w[12] == 1.5
    assert w[13:] == pytest.approx([v + 0.5 for v in sine(12)[::-1]])
    # linear: 0/11 and 1/11 ≈ 0.09 are at or below the threshold and become 0, 2/11 stays
    w = block_lr_weights({"block_lr_zero_threshold": "0.1", "down_lr_weight": "linear"}, is_sdxl=False)
    assert w[:3] == pytest.approx([0.0, 0.0, 2 / 11]) and w[12:] == [1.0] * 13


def test_lists_are_filled_with_one_or_cut_and_sdxl_has_23():
    w = block_lr_weights({"down_lr_weight": "0,0.5", "up_lr_weight": ",".join(["2"] * 15)}, is_sdxl=False)
    assert w[:12] == [0.0, 0.5] + [1.0] * 10 and w[13:] == [2.0] * 12
    w = block_lr_weights({"mid_lr_weight": "0.5", "up_lr_weight": "zeros"}, is_sdxl=True)
    # [embeddings] + 9 input + 3 middle + 9 output + [out]; a short mid list is filled with 1
    assert len(w) == 23 and w[0] == w[22] == 1.0 and w[1:10] == [1.0] * 9
    assert w[10:13] == [0.5, 1.0, 1.0] and w[13:22] == [0.0] * 9
    assert block_lr_weights({}, is_sdxl=True) is None


@pytest.mark.parametrize("name, is_sdxl, index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", False, 1),
    ("lora_unet_down_blocks_0_resnets_1_conv1", False, 2),
    ("lora_unet_down_blocks_1_downsamplers_0_conv", False, 6),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", False, 12),
    ("lora_unet_up_blocks_0_resnets_0_conv1", False, 13),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", False, 18),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", False, 24),
    ("lora_unet_input_blocks_4_1_proj_in", True, 5),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k", True, 11),
    ("lora_unet_output_blocks_8_1_proj_out", True, 21),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", True, -1),
])
def test_block_index_follows_kohya(name, is_sdxl, index):
    assert block_index(name, is_sdxl) == index


def test_block_names_for_the_table():
    assert [block_name(i, False) for i in (0, 1, 3, 12, 13, 15, 24)] == [
        "conv_in", "down_blocks.0.0", "down_blocks.0.sampler", "mid_block", "up_blocks.0.0", "up_blocks.0.2+sampler",
        "up_blocks.3.2"]
    assert [block_name(i, True) for i in (0, 1, 10, 13, 22)] == [
        "embeddings", "input_blocks.0", "middle_block.0", "output_blocks.0", "out"]


def test_block_dims_alphas_and_zero_lr_blocks_get_no_lora():
    dims = ",".join(str(d) for d in [2, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 16, 12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 2])
    p = block_plan({"block_dims": dims, "down_lr_weight": "zeros+0", "mid_lr_weight": "1"}, False, 8, 4.0, 0, 1.0)
    assert p.dims[:13] == [0] * 12 + [16] and p.dims[13:] == [12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 2]
    assert p.alphas == [4.0] * 25 and p.conv_dims is None  # alphas default to network_alpha; no conv rank: no conv
    assert p.rank_of("lora_unet_up_blocks_3_attentions_2_proj_out", False, False, 8, 4.0) == (2, 4.0)
    assert p.rank_of("lora_unet_up_blocks_3_resnets_2_conv1", False, True, 3, 1.0) == (3, 1.0)
    p = block_plan({"conv_block_dims": ",".join(["2"] * 23), "block_dims": ",".join(["4"] * 23)}, True, 8, 8.0, 0, 1.0)
    assert p.conv_alphas == [1.0] * 23 and p.max_conv_dim == 2  # conv_alpha's default, as kohya's
    with pytest.raises(KilnError, match="block_dims needs 25 values for SD1/SD2"):
        block_plan({"block_dims": "1,2,3"}, False, 8, 8.0, 0, 1.0)
    with pytest.raises(KilnError, match="block_alphas needs block_dims"):
        block_plan({"block_alphas": "1"}, False, 8, 8.0, 0, 1.0)


class Host(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)


def test_loraplus_and_block_lr_param_groups():
    assert loraplus_ratios({"loraplus_lr_ratio": "16"}) == (16.0, 16.0)
    assert loraplus_ratios({"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"}) == (16.0, 4.0)
    net = LoRANetwork(Host(), [TargetRule("a|b", ("linear",), 2, 2.0)], lambda p: "lora_unet_" + p)
    net.add(Host(), [TargetRule("a", ("linear",), 2, 2.0)], lambda p: "lora_te_" + p, "clip_l")
    net.block_lr = lambda name: ("unet_block1", 0.5) if name.endswith("a") else ("unet_block2", 2.0)
    net.plus = {"unet": 16.0, "text_encoder": 4.0}
    groups = net.param_groups(1e-4, {"clip_l": 1e-5})
    assert all(len(g["params"]) == 1 for g in groups)
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx({
        "unet_block1": 0.5e-4, "unet_block1 plus": 0.5e-4 * 16,   # the down matrix at the block's rate,
        "unet_block2": 2e-4, "unet_block2 plus": 2e-4 * 16,       # lora_up at that rate · ratio (LoRA+)
        "clip_l": 1e-5, "clip_l plus": 1e-5 * 4})
    up = {id(a.lora_up.weight) for a in net.adapters.values()}
    assert all((id(g["params"][0]) in up) == g["name"].endswith("plus") for g in groups)


def test_rank_of_skips_zero_rank_modules():
    net = LoRANetwork(Host(), [TargetRule("a|b", ("linear",), 2, 2.0)], lambda p: "lora_unet_" + p,
                      rank_of=lambda name, conv, r, a: (0, a) if name.endswith("b") else (3, 1.5))
    assert list(net.adapters) == ["lora_unet_a"] and net.adapters["lora_unet_a"].rank == 3
    assert net.adapters["lora_unet_a"].alpha == 1.5
