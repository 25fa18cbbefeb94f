"""training_args: kohya's key=value options parsed and checked; every key is a TrainConfig field."""

import pytest

from trainer_core.errors import KilnError
from trainer_core.training.loop import TrainConfig
from trainer_core.options.training_args import KEYS, kwargs_value, parse_training_args, split_pairs


def test_values_are_typed_and_only_given_keys_returned():
    args = parse_training_args("max_train_epochs=10\nnoise_offset = 0.05 ; noise_offset_random_strength=true\n"
                               "huber_schedule=exponential", "sdxl", "Train")
    assert args == {"max_train_epochs": 10, "noise_offset": 0.05, "noise_offset_random_strength": True,
                    "huber_schedule": "exponential"}
    assert parse_training_args("", "sd1", "Train") == {}


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(KilnError, match="'noise_ofset' is not a known kohya option. Did you mean 'noise_offset'"):
        parse_training_args("noise_ofset=0.1", "sd1", "Train LoRA (SD1)")


@pytest.mark.parametrize("text, message", [
    ("max_train_epochs=ten", "max_train_epochs must be an integer of at least 1, got 'ten'"),
    ("max_train_epochs=0", "max_train_epochs must be an integer of at least 1"),
    ("huber_schedule=linear", "huber_schedule must be one of constant, exponential, snr"),
    ("noise_offset_random_strength=maybe", "must be true or false"),
    ("max_timestep=1001", "max_timestep must be an integer from 1 to 1000"),
    ("min_timestep=500 max_timestep=400", "min_timestep \\(500\\) must not be above max_timestep \\(400\\)"),
    ("save_last_n_epochs=2", "needs save_every_n_epochs"),
    ("a=1 a=2", "'a' is given twice"),
    ("just words", "write key=value pairs"),
])
def test_bad_values_name_what_is_allowed(text, message):
    with pytest.raises(KilnError, match=message):
        parse_training_args(text, "sd1", "Train")


def test_ddpm_only_keys_are_refused_for_sd3():
    with pytest.raises(KilnError, match="'noise_offset' does not apply to sd3"):
        parse_training_args("noise_offset=0.1", "sd3", "Train")
    assert parse_training_args("min_timestep=100", "sd3", "Train") == {"min_timestep": 100}


def test_nested_arguments_keep_their_own_pairs():
    pairs = split_pairs("optimizer_args=[weight_decay=0.1 betas=0.9,0.99]\nlr_scheduler_args='T_max=100'")
    assert pairs == {"optimizer_args": "[weight_decay=0.1 betas=0.9,0.99]", "lr_scheduler_args": "T_max=100"}
    assert kwargs_value(pairs["optimizer_args"], "optimizer_args") == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    assert kwargs_value('["decouple=True", "d_coef=2"]', "x") == {"decouple": True, "d_coef": 2}


def test_every_key_is_a_train_config_setting_with_kohyas_default():
    defaults = TrainConfig()
    for key, spec in KEYS.items():
        assert defaults.get(key) == spec.default, key


def test_docs_list_every_key():
    from pathlib import Path
    page = (Path(__file__).resolve().parents[2] / "docs" / "training-args.md").read_text(encoding="utf-8")
    assert [k for k in KEYS if f"`{k}`" not in page] == []


def test_max_token_length_and_clip_skip_as_kohya_allows_them():
    assert parse_training_args("max_token_length=225\nclip_skip=2", "sd1", "n") == {"max_token_length": 225,
                                                                                    "clip_skip": 2}
    assert parse_training_args("max_token_length=150", "sdxl", "n") == {"max_token_length": 150}
    with pytest.raises(KilnError, match="75, 150 or 225"):
        parse_training_args("max_token_length=100", "sd1", "n")
    with pytest.raises(KilnError, match="does not apply to sdxl"):  # kohya ignores clip_skip for SDXL
        parse_training_args("clip_skip=2", "sdxl", "n")
    with pytest.raises(KilnError, match="does not apply to sd3"):
        parse_training_args("max_token_length=225", "sd3", "n")
