"""kohya's training --config_file mapped onto Kiln's graph (what the headless CLI runs)."""
import pytest

from trainer_core.errors import KilnError
from trainer_core.kohya_config import graph_from_config

BASE = '''
[model_arguments]
pretrained_model_name_or_path = "model.safetensors"
[dataset_arguments]
dataset_config = "dataset.toml"
[training_arguments]
output_name = "mine"
save_precision = "bf16"
max_train_steps = 800
learning_rate = 1e-4
optimizer_type = "AdamW8bit"
mixed_precision = "bf16"
cache_latents = true
sdpa = true
[network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1"]
'''


def test_sections_flatten_and_keys_map_onto_the_nodes():
    prompt, notes = graph_from_config(BASE, "t.toml", "sdxl")
    train, lora = prompt["6"], prompt["5"]["inputs"]
    assert train["class_type"] == "KilnTrainSDXL" and prompt["1"]["inputs"]["ckpt_name"] == "model.safetensors"
    assert train["inputs"]["steps"] == 800 and train["inputs"]["optimizer"] == "AdamW8bit"
    assert train["inputs"]["precision"] == "bf16"
    # kohya trains the text encoders at learning_rate unless told otherwise
    assert train["inputs"]["text_encoder_lr1"] == train["inputs"]["text_encoder_lr2"] == 1e-4
    assert lora == {"rank": 16, "alpha": 8.0, "dropout": 0.0, "conv_rank": 4, "conv_alpha": 2.0, "rank_dropout": 0.1,
                    "network_args": ""}
    assert prompt["7"]["inputs"]["filename"] == "mine" and prompt["7"]["inputs"]["precision"] == "bf16"
    assert any("cache_latents" in n for n in notes) and any("sdpa" in n for n in notes)


def test_text_encoder_rates_and_unet_only():
    p, _ = graph_from_config(BASE + 'text_encoder_lr = [1e-5, 2e-5]\nunet_lr = 3e-4\n', "t.toml", "sdxl")
    t = p["6"]["inputs"]
    assert (t["learning_rate"], t["text_encoder_lr1"], t["text_encoder_lr2"]) == (3e-4, 1e-5, 2e-5)
    p, _ = graph_from_config(BASE + "network_train_unet_only = true\n", "t.toml", "sd1")
    assert p["6"]["inputs"]["text_encoder_lr"] == 0.0


def test_sd3_keys_and_network_args():
    text = BASE.replace('"networks.lora"', '"networks.lora_sd3"').replace(
        '["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1"]', '["context_attn_dim=8", "train_block_indices=0-3"]')
    p, _ = graph_from_config(text + 'weighting_scheme = "logit_normal"\ntraining_shift = 3.0\n', "t.toml", "sd3")
    t = p["6"]["inputs"]
    assert p["6"]["class_type"] == "KilnTrainSD3" and t["weighting_scheme"] == "logit_normal" and t["training_shift"] == 3.0
    assert t["text_encoder_lr3"] == 0.0  # T5 trains only with train_t5xxl=True, as in kohya
    assert p["5"]["inputs"]["network_args"] == "context_attn_dim=8 train_block_indices=0-3"


@pytest.mark.parametrize("extra, family, message", [
    ("color_jitter = 1\n", "sd1", "kohya key 'color_jitter' is not read"),
    ('weighting_scheme = "mode"\n', "sd1", "is an SD3 option"),
    ('save_model_as = "ckpt"\n', "sd1", "save_model_as must be safetensors"),
    ("", "sd3", "does not train a sd3 model"),
])
def test_what_kiln_cannot_honour_is_refused_by_name(extra, family, message):
    with pytest.raises(KilnError, match=message):
        graph_from_config(BASE + extra, "t.toml", family)
