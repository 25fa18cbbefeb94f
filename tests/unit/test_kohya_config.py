"""kohya's training --config_file mapped onto Kiln's graph (what the headless CLI runs)."""
import pytest

from fixtures.kohya import FLUX_EXAMPLE, SD3_EXAMPLE, SDXL_EXAMPLE, with_keys
from trainer_core.errors import KilnError
from trainer_core.kohya.config import graph_from_config

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


def test_empty_text_encoder_lr_is_unset_and_save_precision_defaults_to_fp32():
    """kohya reads text_encoder_lr = [] as not given (learning_rate), and saves in the trained dtype when
    save_precision is not given (fp32 LoRA weights)."""
    p, _ = graph_from_config(BASE + "text_encoder_lr = []\n", "t.toml", "sdxl")
    assert p["6"]["inputs"]["text_encoder_lr1"] == p["6"]["inputs"]["text_encoder_lr2"] == 1e-4
    p, _ = graph_from_config(BASE.replace('save_precision = "bf16"\n', ""), "t.toml", "sd1")
    assert p["7"]["inputs"]["precision"] == "fp32"


DB = "\n".join(line for line in BASE.splitlines() if not line.startswith(("network_", "[network", "save_precision")))


def test_a_train_db_config_runs_train_dreambooth_not_a_lora():
    text = DB.replace("learning_rate = 1e-4", "learning_rate = 1e-6") + "\nprior_loss_weight = 0.5\nsave_every_n_steps = 100\n"
    prompt, _ = graph_from_config(text, "db.toml", "sd1")
    train = prompt["6"]["inputs"]
    assert prompt["6"]["class_type"] == "KilnTrainDreamBooth" and "5" not in prompt and "lora_config" not in train
    assert train["learning_rate"] == 1e-6 and train["prior_loss_weight"] == 0.5 and train["steps"] == 800
    # train_db.py trains the text encoder by default, at learning_rate unless learning_rate_te is given
    assert train["text_encoder_lr"] == 1e-6 and train["stop_text_encoder_training"] == 0
    assert train["save_every_n_steps"] == 100 and train["save_name"] == "mine"
    assert prompt["7"] == {"class_type": "KilnSaveCheckpoint", "inputs": {
        "model": ["6", 0], "clip": ["6", 1], "vae": ["1", 2], "filename": "mine", "overwrite": True}}


@pytest.mark.parametrize("extra, lr, stop", [
    ("learning_rate_te = 5e-7\nstop_text_encoder_training = 300\n", 5e-7, 300),
    ("stop_text_encoder_training = -1\n", 0.0, 0),   # kohya: -1 = the text encoder never trains
    ("stop_text_encoder_training = 0\n", 0.0, 0),    # stopped before its first step
])
def test_train_db_text_encoder_keys(extra, lr, stop):
    train = graph_from_config(DB + "\n" + extra, "db.toml", "sd1")[0]["6"]["inputs"]
    assert (train["text_encoder_lr"], train["stop_text_encoder_training"]) == (lr, stop)


@pytest.mark.parametrize("extra, family, message", [
    ("no_token_padding = true\n", "sd1", "no_token_padding = true: ComfyUI's SD tokenizer always pads"),
    ("", "sdxl", "this is a sdxl model"),
    ('save_precision = "fp16"\n', "sd1", "save_precision 'fp16'"),
    ("learning_rate_te = 1e-6\nnetwork_module = \"networks.lora\"\n", "sd1",
     "'learning_rate_te' is a key of kohya's train_db.py, not of a LoRA"),
])
def test_train_db_what_kiln_does_not_do_is_refused_by_name(extra, family, message):
    with pytest.raises(KilnError, match=message):
        graph_from_config(DB + "\n" + extra, "db.toml", family)


def test_sd3_keys_and_network_args():
    text = BASE.replace('"networks.lora"', '"networks.lora_sd3"').replace(
        '["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1"]', '["context_attn_dim=8", "train_block_indices=0-3"]')
    p, _ = graph_from_config(text + 'weighting_scheme = "logit_normal"\ntraining_shift = 3.0\n', "t.toml", "sd3")
    t = p["6"]["inputs"]
    assert p["6"]["class_type"] == "KilnTrainSD3" and t["weighting_scheme"] == "logit_normal" and t["training_shift"] == 3.0
    assert t["text_encoder_lr3"] == 0.0  # T5 trains only with train_t5xxl=True, as in kohya
    assert p["5"]["inputs"]["network_args"] == "context_attn_dim=8 train_block_indices=0-3"


@pytest.mark.parametrize("extra, family, message", [
    ("color_jitter = 1\n", "sd1", "'color_jitter' is not a kohya training key Kiln knows"),
    ("shuffle_captions = true\n", "sd1", "did you mean 'shuffle_caption'"),
    ('weighting_scheme = "mode"\n', "sd1", "is an SD3 option"),
    ('save_model_as = "ckpt"\n', "sd1", "save_model_as 'ckpt' is refused: Kiln writes .safetensors only"),
])
def test_what_kiln_cannot_honour_is_refused_by_name(extra, family, message):
    with pytest.raises(KilnError, match=message):
        graph_from_config(BASE + extra, "t.toml", family)


def test_training_options_go_into_training_args():
    extra = ("max_train_epochs = 10\nsave_every_n_epochs = 2\nnoise_offset = 0.0357\n"
             "noise_offset_random_strength = true\nhuber_schedule = \"exponential\"\n")
    p, _ = graph_from_config(BASE + extra, "t.toml", "sdxl")
    assert p["6"]["inputs"]["training_args"].splitlines() == [
        "max_train_epochs=10", "save_every_n_epochs=2", "noise_offset=0.0357", "noise_offset_random_strength=true",
        "huber_schedule=exponential"]
    with pytest.raises(KilnError, match="t.toml: key 'noise_offset' does not apply to sd3"):
        graph_from_config(BASE.replace('"networks.lora"', '"networks.lora_sd3"') + "noise_offset = 0.1\n", "t.toml", "sd3")
    with pytest.raises(KilnError, match="max_train_epochs must be an integer"):
        graph_from_config(BASE + "max_train_epochs = 0\n", "t.toml", "sd1")


def test_optimizer_and_schedule_keys_fill_widgets_or_training_args():
    extra = ('lr_scheduler = "cosine_with_restarts"\nlr_warmup_steps = 0.1\nlr_scheduler_num_cycles = 3\n'
             'optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]\n')
    p, _ = graph_from_config(BASE.replace('"AdamW8bit"', '"adamw8bit"') + extra, "t.toml", "sd1")
    t = p["6"]["inputs"]
    assert t["optimizer"] == "AdamW8bit" and t["lr_scheduler"] == "cosine_with_restarts" and "warmup_steps" not in t
    assert t["training_args"].splitlines() == ["lr_warmup_steps=0.1", "lr_scheduler_num_cycles=3",
                                               "optimizer_args=[weight_decay=0.1 betas=0.9,0.99]"]
    p, _ = graph_from_config(BASE.replace('"AdamW8bit"', '"pytorch_optimizer.CAME"') + "lr_warmup_steps = 50\n",
                             "t.toml", "sd1")
    t = p["6"]["inputs"]
    assert "optimizer" not in t and t["training_args"] == "optimizer_type=pytorch_optimizer.CAME"
    assert t["warmup_steps"] == 50
    with pytest.raises(KilnError, match="lr_scheduler 'rex' is not one of"):
        graph_from_config(BASE + 'lr_scheduler = "rex"\n', "t.toml", "sd1")


def test_kohyas_sdxl_example_config():
    """The docs' example trains the encoders (text_encoder_lr1/2) with cache_text_encoder_outputs: kohya's own
    sdxl_train_network.py refuses that combination, and so does Kiln; with network_train_unet_only it runs."""
    with pytest.raises(KilnError, match="cache_text_encoder_outputs = true while the text encoders train"):
        graph_from_config(SDXL_EXAMPLE, "sdxl.toml", "sdxl")
    p, notes = graph_from_config(SDXL_EXAMPLE + "network_train_unet_only = true\n", "sdxl.toml", "sdxl")
    t = p["6"]["inputs"]
    assert (t["text_encoder_lr1"], t["text_encoder_lr2"], t["learning_rate"]) == (0.0, 0.0, 1e-4)
    p, _ = graph_from_config(SDXL_EXAMPLE.replace("cache_text_encoder_outputs = true\n", ""), "sdxl.toml", "sdxl")
    assert (p["6"]["inputs"]["text_encoder_lr1"], p["6"]["inputs"]["text_encoder_lr2"]) == (1e-5, 1e-5)
    assert t["training_args"].splitlines() == ["max_train_epochs=10", "save_every_n_epochs=1"]
    assert t["save_name"] == "my_sdxl_lora" and t["precision"] == "bf16" and t["gradient_checkpointing"] is True


def test_kohyas_sd3_example_config():
    p, notes = graph_from_config(SD3_EXAMPLE, "sd3.toml", "sd3")
    t = p["6"]["inputs"]
    assert p["3"] == {"class_type": "TripleCLIPLoader", "inputs": {
        "clip_name1": "te/clip_l.safetensors", "clip_name2": "te/clip_g.safetensors", "clip_name3": "te/t5xxl.safetensors"}}
    assert t["clip"] == ["3", 0] and t["weighting_scheme"] == "uniform" and t["precision"] == "fp16"
    assert any("networks.lora_sd3" in n for n in notes) and "blocks_to_swap=32" in t["training_args"].splitlines()
    with pytest.raises(KilnError, match="networks.lora_sd3' does not train a sd1 model"):
        graph_from_config(BASE.replace('"networks.lora"', '"networks.lora_sd3"'), "x.toml", "sd1")
    with pytest.raises(KilnError, match="text_encoder_lr3 does not exist for sdxl"):
        graph_from_config(SDXL_EXAMPLE + "text_encoder_lr3 = 1e-5\n", "x.toml", "sdxl")


def lycoris(args: str) -> str:
    return BASE.replace('"networks.lora"', '"lycoris.kohya"').replace(
        '["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1"]', args)


@pytest.mark.parametrize("args, want", [
    ('["algo=lokr", "factor=8", "conv_dim=4", "conv_alpha=1", "use_tucker=False"]',
     {"algorithm": "lokr", "factor": 8, "conv_rank": 4, "conv_alpha": 1.0}),
    ('["algo=lokr", "full_matrix=True"]', {"algorithm": "lokr", "full_matrix": True}),
    ('["algo=loha", "module_dropout=0.1"]', {"algorithm": "loha", "module_dropout": 0.1}),
    ('["algo=locon", "dora_wd=True", "dropout=0.05"]', {"algorithm": "dora", "dropout": 0.05}),
    ('["algo=lora"]', {"algorithm": "lora"}),
])
def test_lycoris_network_args_map_onto_lora_config(args, want):
    for family in ("sd1", "sdxl", "sd3"):
        p, _ = graph_from_config(lycoris(args), "t.toml", family)
        lora = p["5"]["inputs"]
        assert {k: lora[k] for k in want} == want and lora["network_args"] == ""


def test_lycoris_keeps_family_network_args():
    p, _ = graph_from_config(lycoris('["algo=loha", "context_attn_dim=8", "verbose=True"]'), "t.toml", "sd3")
    assert p["5"]["inputs"]["network_args"] == "context_attn_dim=8 verbose=True"


@pytest.mark.parametrize("args, message", [
    ('["algo=glora"]', "algo=glora is a LyCORIS algorithm Kiln does not train"),
    ('["algo=ia3"]', "algo=ia3 is a LyCORIS algorithm Kiln does not train"),
    ('["algo=boft"]', "algo=boft is a LyCORIS algorithm Kiln does not train"),
    ('["algo=lokr", "use_tucker=True"]', "use_tucker=True: Kiln does not offer Tucker"),
    ('["algo=lokr", "decompose_both=True"]', "decompose_both"),
    ('["algo=lokr", "preset=full"]', "preset=full"),
    ('["algo=loha", "dora_wd=True"]', "DoRA on LoRA"),
    ('["algo=locon", "dora_wd=True", "wd_on_output=True"]', "wd_on_output=True"),
])
def test_lycoris_what_kiln_does_not_have_is_refused_by_name(args, message):
    with pytest.raises(KilnError, match=message):
        graph_from_config(lycoris(args), "t.toml", "sdxl")


def test_network_alpha_zero_trains_at_scale_one():
    """network_alpha = 0 reaches the LoRA Config as 0, which every adapter reads as alpha = rank (kohya)."""
    from torch import nn
    from trainer_core.lora.modules import LoRAModule
    p, _ = graph_from_config(BASE.replace("network_alpha = 8", "network_alpha = 0"), "t.toml", "sd1")
    lora = p["5"]["inputs"]
    assert lora["alpha"] == 0.0
    assert LoRAModule("n", nn.Linear(4, 4), lora["rank"], lora["alpha"]).scale == 1.0
    assert LoRAModule("n", nn.Conv2d(2, 2, 3), lora["conv_rank"], 0).alpha == lora["conv_rank"]


def test_alpha_mask_and_masked_loss_keys():
    from trainer_core.kohya.config import check_dataset_masks
    p, _ = graph_from_config(BASE + "alpha_mask = true\n", "t.toml", "sd1")
    assert p["9"]["class_type"] == "KilnMaskSource" and p["9"]["inputs"]["mode"] == "alpha"
    assert p["4"]["inputs"]["dataset"] == ["9", 0] and p["9"]["inputs"]["dataset"] == ["2", 0]
    p, _ = graph_from_config(BASE + "masked_loss = true\n", "t.toml", "sd1")
    assert "9" not in p and p["4"]["inputs"]["dataset"] == ["2", 0]
    masks = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "i"\nconditioning_data_dir = "m"\n'
    with pytest.raises(KilnError, match="only with masked_loss = true"):
        check_dataset_masks({}, masks, "t.toml")
    check_dataset_masks({"masked_loss": True}, masks, "t.toml")
    with pytest.raises(KilnError, match="alpha channels or by mask folders"):
        check_dataset_masks({"masked_loss": True, "alpha_mask": True}, masks, "t.toml")
    check_dataset_masks({"alpha_mask": True}, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "i"\n', "t.toml")


@pytest.mark.parametrize("key", ["enable_scaled_pos_embed = true", "stop_text_encoder_training = 100",
                                 "no_token_padding = true", "color_aug = true", "random_crop = true",
                                 "face_crop_aug_range = \"2.0,4.0\"", "token_warmup_step = 10",
                                 "huggingface_repo_id = \"me/lora\"", "deepspeed = true", "base_weights = [\"a\"]",
                                 "initial_step = 100", "in_json = \"meta.json\"", "no_metadata = true"])
def test_keys_kiln_refuses_in_a_lora_config_name_the_reason(key):
    with pytest.raises(KilnError, match=key.split(" ")[0] + " is refused: "):
        graph_from_config(BASE + key + "\n", "t.toml", "sd3" if "pos_embed" in key else "sd1")


def test_a_separate_vae_file_feeds_cache_latents():
    p, _ = graph_from_config(BASE + 'vae = "vae/sdxl_vae.safetensors"\n', "t.toml", "sdxl")
    assert p["10"] == {"class_type": "VAELoader", "inputs": {"vae_name": "vae/sdxl_vae.safetensors"}}
    assert p["4"]["inputs"]["vae"] == ["10", 0]
    p, _ = graph_from_config(BASE, "t.toml", "sdxl")
    assert "10" not in p and p["4"]["inputs"]["vae"] == ["1", 2]


def test_unset_keys_train_with_kohyas_defaults_not_the_nodes():
    """kohya's argparse defaults: learning_rate 2e-6, max_train_steps 1600, mixed_precision "no" (fp32); the text
    encoders fall back to that learning_rate too. v_parameterization is honoured as kohya honours it."""
    minimal = ('pretrained_model_name_or_path = "m.safetensors"\ndataset_config = "d.toml"\n'
               'network_module = "networks.lora"\n')
    p, notes = graph_from_config(minimal, "t.toml", "sd1")
    t = p["6"]["inputs"]
    assert (t["learning_rate"], t["steps"], t["precision"], t["text_encoder_lr"]) == (2e-6, 1600, "fp32", 2e-6)
    assert any("kohya's defaults" in n for n in notes) and any("seed not set" in n for n in notes)
    p, _ = graph_from_config(minimal + "max_train_epochs = 3\nunet_lr = 1e-4\n", "t.toml", "sd1")
    assert "steps" not in p["6"]["inputs"] and p["6"]["inputs"]["learning_rate"] == 1e-4
    p, _ = graph_from_config(minimal + "v_parameterization = true\n", "t.toml", "sd1")
    assert p["11"]["inputs"] == {"model": ["1", 0], "sampling": "v_prediction", "zsnr": False}
    assert p["6"]["inputs"]["model"] == ["11", 0]
    with pytest.raises(KilnError, match="v_parameterization does not apply to SD3"):
        graph_from_config(minimal + "v_parameterization = true\n", "t.toml", "sd3")


def test_docs_list_every_config_key_the_cli_knows():
    from pathlib import Path
    from trainer_core.kohya import config as k
    doc = (Path(__file__).resolve().parents[2] / "docs" / "kohya.md").read_text(encoding="utf-8")
    section = doc.split("## Every kohya config key")[1].split("\n## ")[0]
    keys = k.known_keys() - set(k.TRAINING_ARGS)
    assert sorted(key for key in keys if f"`{key}`" not in section) == []


def test_refused_keys_at_kohyas_defaults_ask_for_nothing():
    """kohya_ss writes every key: at kohya's default (off, empty, 0) a refused key is accepted."""
    extra = ('color_aug = false\nrandom_crop = false\nface_crop_aug_range = ""\ntoken_warmup_min = 1\n'
             'token_warmup_step = 0\nhuggingface_repo_id = ""\ndeepspeed = false\nno_metadata = false\n'
             'base_weights = []\nsave_state = true\nxformers = true\n')
    _, notes = graph_from_config(BASE + extra, "t.toml", "sd1")
    assert any(n.startswith("save_state: no effect in Kiln (Kiln writes a resumable .kiln-state") for n in notes)


def test_every_refusal_says_why_and_what_to_use():
    from trainer_core.kohya import config as k
    for key, reason in k.REFUSED.items():
        assert len(reason) > 40 and any(w in reason for w in (";", ":", ".", "use", "Use")), key


def test_kohyas_old_optimizer_switches_and_the_vae_batch_size():
    base = BASE.replace('optimizer_type = "AdamW8bit"\n', "")
    p, _ = graph_from_config(base + "use_lion_optimizer = true\nvae_batch_size = 8\n", "t.toml", "sd1")
    assert p["6"]["inputs"]["optimizer"] == "Lion" and p["4"]["inputs"]["batch_size"] == 8
    p, _ = graph_from_config(base + "use_8bit_adam = true\n", "t.toml", "sd1")
    assert p["6"]["inputs"]["optimizer"] == "AdamW8bit"
    with pytest.raises(KilnError, match="use_8bit_adam and optimizer_type are both set"):
        graph_from_config(BASE + "use_8bit_adam = true\n", "t.toml", "sd1")
    with pytest.raises(KilnError, match="use_8bit_adam and use_lion_optimizer are both set"):
        graph_from_config(base + "use_8bit_adam = true\nuse_lion_optimizer = true\n", "t.toml", "sd1")


def test_a_folder_dataset_resume_and_flux_keys():
    folders = BASE.replace('dataset_config = "dataset.toml"', 'train_data_dir = "train"\nresolution = "512"')
    p, _ = graph_from_config(folders, "t.toml", "sd1")
    assert p["2"]["inputs"]["folder"] == "train"  # the CLI writes the TOML the flags describe and names it here
    p, notes = graph_from_config(BASE + 'resume = "out/mine-000002-state"\n', "t.toml", "sd1")
    assert p["6"]["inputs"]["resume_from"] == "out/mine-000002-state" and any("resume:" in n for n in notes)
    with pytest.raises(KilnError, match="resume and network_weights both"):
        graph_from_config(BASE + 'resume = "r"\nnetwork_weights = "w.safetensors"\n', "t.toml", "sd1")
    with pytest.raises(KilnError, match="guidance_scale is a flux_train_network.py option; this is a sd1 model"):
        graph_from_config(BASE + "guidance_scale = 1.0\n", "t.toml", "sd1")
    with pytest.raises(KilnError, match="has no dataset: give dataset_config"):
        graph_from_config(BASE.replace('dataset_config = "dataset.toml"', ""), "t.toml", "sd1")


FLUX_CONFIG = with_keys(FLUX_EXAMPLE, network_train_unet_only=True)  # kohya requires it with cached TE outputs


def test_kohyas_flux_example_maps_onto_train_lora_flux():
    prompt, notes = graph_from_config(FLUX_CONFIG, "t.toml", "flux")
    train = prompt["6"]["inputs"]
    assert prompt["6"]["class_type"] == "KilnTrainFlux"
    # the files as flux_train_network loads them: the diffusion model, CLIP-L + T5-XXL, ae
    assert prompt["1"] == {"class_type": "UNETLoader",
                           "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}}
    assert prompt["3"] == {"class_type": "DualCLIPLoader", "inputs": {
        "clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}}
    assert prompt["10"] == {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}
    assert prompt["4"]["inputs"]["vae"] == ["10", 0] and train["clip"] == ["3", 0] and train["model"] == ["1", 0]
    assert (train["timestep_sampling"], train["discrete_flow_shift"], train["model_prediction_type"],
            train["guidance_scale"]) == ("shift", 3.1582, "raw", 1.0)
    assert (train["text_encoder_lr1"], train["text_encoder_lr3"]) == (0.0, 0.0) and "text_encoder_lr2" not in train
    assert "blocks_to_swap=18" in train["training_args"] and train["gradient_checkpointing"] is True
    assert prompt["5"]["inputs"]["rank"] == 16 and prompt["5"]["inputs"]["alpha"] == 1.0
    assert any(n.startswith("sdpa: no effect") for n in notes)


def test_flux_text_encoder_rates_files_and_model_type():
    base = FLUX_CONFIG.replace("network_train_unet_only = true\n", "").replace(
        "cache_text_encoder_outputs = true\n", "")
    # kohya's lora_flux: text_encoder_lr = [CLIP-L, T5-XXL]; T5 trains only with train_t5xxl
    p, _ = graph_from_config(base + "text_encoder_lr = [1e-5, 2e-5]\n", "t.toml", "flux")
    assert (p["6"]["inputs"]["text_encoder_lr1"], p["6"]["inputs"]["text_encoder_lr3"]) == (1e-5, 0.0)
    p, _ = graph_from_config(base + 'text_encoder_lr = [1e-5, 2e-5]\nnetwork_args = ["train_t5xxl=True"]\n', "t.toml",
                             "flux")
    assert (p["6"]["inputs"]["text_encoder_lr1"], p["6"]["inputs"]["text_encoder_lr3"]) == (1e-5, 2e-5)
    # Chroma: T5-XXL alone (ComfyUI's CLIPLoader type chroma), guidance 0
    chroma = base.replace('clip_l = "clip_l.safetensors"\n', "") + 'model_type = "chroma"\n'
    p, _ = graph_from_config(chroma.replace("guidance_scale = 1.0", "guidance_scale = 0.0"), "t.toml", "flux")
    assert p["3"] == {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl_fp16.safetensors", "type": "chroma"}}
    # no t5xxl: CLIP-L's plain encode, said in a note (cli.py checks the model's context width)
    p, notes = graph_from_config(base.replace('t5xxl = "t5xxl_fp16.safetensors"\n', ""), "t.toml", "flux")
    assert p["3"]["class_type"] == "CLIPLoader" and p["3"]["inputs"]["type"] == "stable_diffusion"
    assert any(n.startswith("no t5xxl") for n in notes)
    for change, error in [
        (lambda c: c.replace('ae = "ae.safetensors"\n', ""), "needs ae"),
        (lambda c: c.replace('clip_l = "clip_l.safetensors"\n', ""), "FLUX.1 needs clip_l"),
        (lambda c: c + 'model_type = "chroma"\n', "Chroma has no CLIP-L"),
        (lambda c: c + 'model_type = "sd3"\n', "model_type 'sd3'"),
        (lambda c: c + 'clip_g = "g.safetensors"\n', "clip_g names a text-encoder file of another family"),
        (lambda c: c + "text_encoder_lr2 = 1e-5\n", "text_encoder_lr2 does not exist for flux"),
        (lambda c: c.replace("networks.lora_flux", "networks.lora_sd3"), "does not train a flux model"),
        (lambda c: c + "training_shift = 3.0\n", "training_shift is an SD3 option"),
        (lambda c: c + "min_snr_gamma = 5\n", "min_snr_gamma does not apply to flux"),
        (lambda c: c + "v_parameterization = true\n", "v_parameterization does not apply to FLUX"),
        (lambda c: c + "split_mode = true\n", "split_mode is refused: it is obsolete.*use blocks_to_swap"),
        (lambda c: c + "apply_t5_attn_mask = true\n", "apply_t5_attn_mask is refused"),
        (lambda c: c + 'controlnet_model_name_or_path = "cn.safetensors"\n', "ControlNet"),
    ]:
        with pytest.raises(KilnError, match=error):
            graph_from_config(change(base), "t.toml", "flux")
    with pytest.raises(KilnError, match="ae is a flux_train_network.py option; this is a sdxl model"):
        graph_from_config(BASE + 'ae = "ae.safetensors"\n', "t.toml", "sdxl")
    # SD3 has apply_t5_attn_mask: Flux's refusal is Flux's alone
    p, _ = graph_from_config(BASE.replace("networks.lora", "networks.lora_sd3") + "apply_t5_attn_mask = true\n",
                             "t.toml", "sd3")
    assert p["6"]["inputs"]["apply_t5_attn_mask"] is True
