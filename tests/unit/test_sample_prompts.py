"""kohya's sample prompts: per-line options, prompt files, sample_sampler names (train_util.line_to_prompt_dict,
load_prompts, get_my_scheduler)."""
import json

import pytest

from trainer_core.errors import KilnError
from trainer_core.kohya.config import graph_from_config
from trainer_core.kohya.sample_prompts import (SamplePrompt, comfy_sampler, is_prompt_file, load_prompt_file, parse_line,
                                         parse_sample_prompts)


def test_a_line_with_every_option_keeps_only_the_prompt_as_text():
    notes = []
    p = parse_line("a cat, red hair --n blurry, lowres --w 768 --h 512 --d 42 --s 28 --l 6.5 --ss euler_a", "t", notes)
    assert p == SamplePrompt("a cat, red hair", "blurry, lowres", 768, 512, 42, 28, 6.5, "euler_a")
    assert notes == []


def test_options_are_case_insensitive_steps_clamped_and_others_reported():
    notes = []
    p = parse_line("a dog --W 64 --S 5000 --g 3.5 --cn pose.png", "t", notes)
    assert (p.prompt, p.width, p.steps) == ("a dog", 64, 1000)  # kohya clamps --s to 1..1000
    assert len(notes) == 2 and "--g" in notes[0] and "no effect" in notes[0] and "--cn" in notes[1]


@pytest.mark.parametrize("line, message", [
    ("a --x 3", "--x is not a kohya sample-prompt option"),
    ("a --w wide", "--w needs a number"),
    ("a --w 100", "multiple of 8"),
    ("a --ss karras", "not one of kohya's sample_sampler names"),
])
def test_bad_options_are_refused_by_name(line, message):
    with pytest.raises(KilnError, match=message):
        parse_line(line, "t", [])


def test_widget_text_skips_blank_and_comment_lines():
    prompts = parse_sample_prompts("# previews\na toy --d 1\n\n  a cup --n blur\n", [])
    assert [(p.prompt, p.seed, p.negative) for p in prompts] == [("a toy", 1, None), ("a cup", None, "blur")]
    assert is_prompt_file(" prompts.toml ") and not is_prompt_file("a toy\nprompts.txt")


def test_prompt_files_txt_toml_json(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na toy --w 64 --h 96\n\na cup\n", encoding="utf-8")
    assert [(p.prompt, p.width, p.height) for p in load_prompt_file(str(tmp_path / "p.txt"), [])] == [
        ("a toy", 64, 96), ("a cup", None, None)]
    (tmp_path / "p.toml").write_text('[prompt]\nnegative_prompt = "blurry"\nwidth = 64\nsample_steps = 3\n'
                                     '[[prompt.subset]]\nprompt = "a toy"\nseed = 5\n'
                                     '[[prompt.subset]]\nprompt = "a cup"\nwidth = 128\nscale = 4.0\n'
                                     'sample_sampler = "k_euler"\n', encoding="utf-8")
    toml = load_prompt_file(str(tmp_path / "p.toml"), [])
    assert toml == [SamplePrompt("a toy", "blurry", 64, None, 5, 3, None, None),
                    SamplePrompt("a cup", "blurry", 128, None, None, 3, 4.0, "k_euler")]
    (tmp_path / "p.json").write_text(json.dumps(["a toy --d 3", {"prompt": "a cup", "height": 64}]), encoding="utf-8")
    assert load_prompt_file(str(tmp_path / "p.json"), []) == [SamplePrompt("a toy", seed=3),
                                                              SamplePrompt("a cup", height=64)]
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x", "guidance": 1}]), encoding="utf-8")
    with pytest.raises(KilnError, match="'guidance' is not read"):
        load_prompt_file(str(tmp_path / "bad.json"), [])


def test_kohya_sampler_names_map_onto_comfyui():
    assert comfy_sampler("ddim", "t") == ("ddim", "ddim_uniform")
    assert comfy_sampler("k_euler_a", "t") == comfy_sampler("euler_a", "t") == ("euler_ancestral", "normal")
    assert comfy_sampler("DPMSolver++", "t") == ("dpmpp_2m", "normal")


def test_config_sample_keys():
    base = ('pretrained_model_name_or_path = "m.safetensors"\ndataset_config = "d.toml"\noutput_name = "mine"\n'
            'network_module = "networks.lora"\n')
    p, notes = graph_from_config(base + 'sample_prompts = "prompts.txt"\nsample_every_n_steps = 50\n'
                                 'sample_at_first = true\n', "t.toml", "sd1")
    train = p["6"]["inputs"]
    assert train["sample_prompts"] == "prompts.txt" and train["sample_every"] == 50
    assert "sample_sampler=ddim" in train["training_args"] and "sample_at_first=true" in train["training_args"]
    assert any("kohya's default, ddim" in n for n in notes)
    assert p["8"] == {"class_type": "SaveImage", "inputs": {"images": ["6", 2], "filename_prefix": "mine_sample"}}
    p, notes = graph_from_config(base + 'sample_prompts = "p.toml"\nsample_sampler = "euler_a"\n', "t.toml", "sd1")
    assert "sample_sampler=euler_a" in p["6"]["inputs"]["training_args"] and not any("ddim" in n for n in notes)
