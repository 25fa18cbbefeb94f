"""kohya's command lines pasted after cli.py: read into the keys a --config_file gives, so one mapping serves both."""
import pytest

from fixtures.kohya import (SD3_COMMAND, SD3_EXAMPLE, SDXL_COMMAND, SDXL_EXAMPLE, TRAIN_DB_COMMAND,
                            TRAIN_NETWORK_COMMAND, command_args, with_keys)
from trainer_core.errors import KilnError
from trainer_core.kohya.command_line import processes_asked, read_command
from trainer_core.kohya.config import graph_from_config, known_keys, read_config
from trainer_core.kohya.flags import FLAGS, SCRIPTS


def command(args, files=None):
    return read_command(args, lambda path: read_config(open(path).read(), path), known_keys())


def test_kohyas_example_commands_give_the_keys_of_their_config_files():
    for text, config, family in ((SDXL_COMMAND, SDXL_EXAMPLE, "sdxl"), (SD3_COMMAND, SD3_EXAMPLE, "sd3")):
        own, cmd = command(command_args(text))
        assert own == [] and cmd.launcher == ["accelerate", "launch", "--num_cpu_threads_per_process", "1"]
        assert cmd.family == family and cmd.keys == read_config(config, "c.toml")
        # kohya's sdxl_train_network.py refuses its own example (cached outputs of trained encoders): so does Kiln
        unet_only = command(command_args(text, network_train_unet_only=True))[1].keys
        config = with_keys(config, network_train_unet_only=True)
        assert graph_from_config(unet_only, cmd.script, family) == graph_from_config(config, cmd.script, family)
    with pytest.raises(KilnError, match="sdxl_train_network.py: cache_text_encoder_outputs = true while the text"):
        graph_from_config(command(command_args(SDXL_COMMAND))[1].keys, "sdxl_train_network.py", "sdxl")
    own, cmd = command(command_args(TRAIN_NETWORK_COMMAND))
    assert (cmd.script, cmd.family, cmd.dreambooth) == ("train_network.py", "sd1", False)
    assert cmd.keys["sdpa"] is True and cmd.keys["network_dim"] == 16 and cmd.keys["learning_rate"] == 1e-4
    _, db = command(command_args(TRAIN_DB_COMMAND))
    assert db.dreambooth and db.keys["max_train_steps"] == 1600 and db.keys["cache_latents"] is True


def test_the_forms_argparse_takes():
    own, cmd = command(["--comfyui", "/c", "python3", "sdxl_train_network.py", "--network_dim", "8",
                        "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99", "--text_encoder_lr", "1e-5", "2e-5",
                        "--lr_warmup_steps=0.1", "--lr_decay_steps", "10%", "--adaptive_noise_scale", "-0.5",
                        "--network_args=conv_dim=4", "--network_dim=16", "--gradient_check", "--sample_prompts",
                        "a cat --n dog"][:-1] + ["prompts.txt"])
    assert own == ["--comfyui", "/c"] and cmd.launcher == ["python3"]
    assert cmd.keys == {"network_dim": 16,  # the last one wins
                        "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99"], "text_encoder_lr": [1e-5, 2e-5],
                        "lr_warmup_steps": 0.1, "lr_decay_steps": 0.1, "adaptive_noise_scale": -0.5,
                        "network_args": ["conv_dim=4"], "gradient_checkpointing": True,  # a unique prefix
                        "sample_prompts": "prompts.txt"}
    assert command(["train_network.py", "--text_encoder_lr"])[1].keys == {"text_encoder_lr": []}
    assert command(["--config", "x.toml"]) is None  # no kohya script: cli.py's own options


def test_kilns_own_keys_are_flags_too():
    _, cmd = command(["train_network.py", "--ema_decay=0.999", "--ema_warmup=false", "--weighted_captions",
                      "--diff_output_preservation"])
    assert cmd.keys == {"ema_decay": 0.999, "ema_warmup": False, "weighted_captions": True,
                        "diff_output_preservation": True}


def test_config_file_merges_under_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.toml").write_text('[training]\nnetwork_dim = 4\nlearning_rate = 1e-3\ncache_latents = false\n')
    _, cmd = command(["train_network.py", "--config_file", "base", "--network_dim=8", "--cache_latents"])
    assert cmd.config_file == "base.toml"  # kohya adds .toml
    assert cmd.keys == {"network_dim": 8, "learning_rate": 1e-3, "cache_latents": True}
    with pytest.raises(KilnError, match="--config_file missing.toml not found"):
        command(["train_network.py", "--config_file=missing.toml"])


@pytest.mark.parametrize("args, message", [
    (["train_network.py", "--network_dimm=4"], "--network_dimm is not a flag of kohya's train_network.py. Did you "
                                               "mean --network_dim?"),
    (["train_db.py", "--network_dim=4"], "--network_dim is not a flag of kohya's train_db.py .*train_network.py"),
    (["train_network.py", "--weighting_scheme=uniform"], "sd3_train_network.py and flux_train_network.py have it"),
    (["train_network.py", "--cache_latents=true"], "--cache_latents takes no value"),
    (["train_network.py", "--network_dim", "four"], "--network_dim takes an integer, got four"),
    (["train_network.py", "--seed", "1", "2"], "--seed takes one value"),
    (["train_network.py", "out.safetensors"], "'out.safetensors' is not a flag"),
    (["train_network.py", "--save_every"], "--save_every is ambiguous"),
])
def test_what_kohya_would_not_take_is_refused_by_name(args, message):
    with pytest.raises(KilnError, match=message):
        command(args)


def test_launchers_asking_for_several_processes():
    assert processes_asked(["accelerate", "launch", "--num_cpu_threads_per_process", "1"]) == 1
    assert processes_asked(["accelerate", "launch", "--multi_gpu", "--num_processes=4"]) == 4
    assert processes_asked(["torchrun", "--nproc_per_node", "2"]) == 2


def test_every_script_takes_the_common_flags_and_its_own():
    assert {"pretrained_model_name_or_path", "dataset_config", "config_file"} <= SCRIPTS["train_db.py"][1]
    assert "weighting_scheme" in SCRIPTS["sd3_train_network.py"][1] - SCRIPTS["sdxl_train_network.py"][1]
    assert "stop_text_encoder_training" in SCRIPTS["train_db.py"][1] - SCRIPTS["train_network.py"][1]
    assert len(FLAGS) > 220
