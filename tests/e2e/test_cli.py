"""cli.py: an example workflow run headless (ComfyUI's validator and executor in a fresh process, no server)."""
from __future__ import annotations

import os
import subprocess

import pytest
from safetensors import safe_open

from fixtures.datasets import make_dataset
from fixtures.kohya import (SD3_COMMAND, SDXL_COMMAND, TRAIN_DB_FOLDERS_COMMAND, TRAIN_NETWORK_COMMAND, command_args,
                            write_dataset_config)
from test_sd1_workflow import REPO

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_sd1_path):
    root = tmp_path_factory.mktemp("cli")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "checkpoints" / tiny_sd1_path.name).symlink_to(tiny_sd1_path)
    (root / "custom_nodes").mkdir()  # Kiln is not installed there: the CLI loads the pack it belongs to
    make_dataset(root / "input" / "kiln_demo")
    return root


def cli(kiln_env, base, *args):
    cmd = [kiln_env.python, str(REPO / "cli.py"), "--comfyui", str(kiln_env.comfyui),
           "--workflow", str(REPO / "example_workflows" / "api" / "sd1_lora.json"), *args,
           "--", "--cpu", "--base-directory", str(base)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd="/",
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


def cli_config(kiln_env, base, config, *args, timeout=600):
    """``cli.py --config config *args`` over ``base`` on the CPU."""
    cmd = [kiln_env.python, str(REPO / "cli.py"), "--comfyui", str(kiln_env.comfyui), "--config", str(config), *args,
           "--", "--cpu", "--base-directory", str(base)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")


def test_cli_runs_the_example_workflow_with_overrides(kiln_env, base):
    run = cli(kiln_env, base, "--set", "6.steps=4", "--set", "KilnTrainSD1.sample_every=0",
              "--set", "7.filename=kiln/from_cli")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "[kiln]   step 4/4" in run.stdout and "[kiln] done" in run.stdout
    with safe_open(str(base / "models" / "loras" / "kiln" / "from_cli.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "4" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_cli_reports_an_invalid_workflow_by_node_and_fails(kiln_env, base):
    run = cli(kiln_env, base, "--set", "1.ckpt_name=no_such_model.safetensors")
    assert run.returncode == 1
    assert "node 1 Load Checkpoint" in run.stderr and "ckpt_name" in run.stderr and "no_such_model" in run.stderr


def test_cli_trains_from_a_kohya_config_file(kiln_env, base, tiny_sd1_path, tmp_path):
    images = base / "input" / "kiln_demo" / "train"
    write_dataset_config(tmp_path / "dataset.toml", images / "5_kiln toy")
    (tmp_path / "train.toml").write_text(f'''
[model_arguments]
pretrained_model_name_or_path = "{tiny_sd1_path}"
[dataset_arguments]
dataset_config = "dataset.toml"
[training_arguments]
output_dir = "out"
output_name = "from_kohya"
max_train_epochs = 2
save_every_n_epochs = 1
noise_offset = 0.05
loss_type = "huber"
huber_schedule = "exponential"
learning_rate = 2e-3
network_train_unet_only = true
cache_latents = true
fp8_base = true
[network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 4
''')
    run = cli_config(kiln_env, base, tmp_path / "train.toml", "--set", "6.sample_steps=1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "a sd1 run of KilnTrainSD1" in run.stdout and "cache_latents: no effect" in run.stdout
    with safe_open(str(tmp_path / "out" / "from_kohya.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "4" and not any(k.startswith("lora_te") for k in keys)
    # kohya's epochs: steps = 2 × batches per epoch; the epoch-1 LoRA is written as kohya names it
    assert int(meta["ss_steps"]) == 2 * int(meta["ss_num_batches_per_epoch"]) and meta["ss_epoch"] == "2"
    assert (meta["ss_noise_offset"], meta["ss_loss_type"], meta["ss_huber_schedule"]) == ("0.05", "huber", "exponential")
    assert (tmp_path / "out" / "from_kohya-000001.safetensors").is_file()
    assert "epoch 2/2" in run.stdout
    # fp8_base: ComfyUI loaded the UNet's weights as fp8 (the Train node checks them) and the file says so
    assert "ComfyUI runs with --fp8_e4m3fn-unet" in run.stdout and meta["ss_fp8_base"] == "True"


def test_cli_runs_a_train_db_config_as_dreambooth(kiln_env, base, tiny_sd1_path, tmp_path):
    """kohya's train_db.py config (no network_module): the whole UNet trains, with regularization images, and a
    full checkpoint is written where output_dir/output_name say, as kohya's train_db saves it."""
    make_dataset(base / "input" / "kiln_reg_cli", seed=1)
    images, reg = base / "input" / "kiln_demo" / "train", base / "input" / "kiln_reg_cli" / "train"
    write_dataset_config(tmp_path / "dataset.toml", images / "5_kiln toy", reg / "5_kiln toy")
    (tmp_path / "db.toml").write_text(f'''
pretrained_model_name_or_path = "{tiny_sd1_path}"
dataset_config = "dataset.toml"
output_dir = "out"
output_name = "db_kohya"
max_train_steps = 8
save_every_n_steps = 4
learning_rate = 5e-4
prior_loss_weight = 1.0
stop_text_encoder_training = -1
optimizer_type = "AdamW"
max_grad_norm = 0.0
fused_backward_pass = true
cache_latents = true
''')
    run = cli_config(kiln_env, base, tmp_path / "db.toml", "--set", "6.sample_steps=1", timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "a sd1 run of KilnTrainDreamBooth" in run.stdout and "[kiln]   step 8/8" in run.stdout
    with safe_open(str(tmp_path / "out" / "db_kohya.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert "model.diffusion_model.out.2.weight" in keys and "first_stage_model.taesd_decoder.1.weight" in keys
    assert "ss_network_module" not in meta and meta["kiln_trained"] == "unet" and meta["ss_steps"] == "8"
    assert int(meta["ss_num_reg_images"]) > 0 and meta["ss_fused_backward_pass"] == "True"
    assert float(meta["kiln_probe_loss_end"]) < float(meta["kiln_probe_loss_start"])
    assert (tmp_path / "out" / "db_kohya-step00000004.safetensors").is_file()


def test_cli_lycoris_config_then_network_weights_with_dim_from_weights(kiln_env, base, tiny_sd1_path, tmp_path):
    pytest.importorskip("lycoris.functional")
    write_dataset_config(tmp_path / "dataset.toml", base / "input" / "kiln_demo" / "train" / "5_kiln toy")

    def run(name, network, extra=""):
        (tmp_path / f"{name}.toml").write_text(
            f'pretrained_model_name_or_path = "{tiny_sd1_path}"\ndataset_config = "dataset.toml"\noutput_dir = "out"\n'
            f'output_name = "{name}"\nmax_train_steps = 2\nlearning_rate = 2e-3\nnetwork_train_unet_only = true\n'
            f'network_module = "lycoris.kohya"\n{network}\n{extra}')
        return cli_config(kiln_env, base, tmp_path / f"{name}.toml", "--set", "6.sample_steps=1")

    first = run("lokr", 'network_dim = 4\nnetwork_alpha = 2\nnetwork_args = ["algo=lokr", "factor=4", "conv_dim=2"]')
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    with safe_open(str(tmp_path / "out" / "lokr.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya" and any(k.endswith(".lokr_w1") for k in keys)
    # a config with other dims: dim_from_weights takes the file's algorithm and shape and continues from it
    again = run("again", 'network_dim = 16\nnetwork_args = ["algo=loha"]',
                f'network_weights = "out/lokr.safetensors"\ndim_from_weights = true')
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "dim_from_weights: {'algorithm': 'lokr', 'rank': 4, 'alpha': 2.0, 'conv_rank': 2" in again.stdout
    assert "resume_from lokr.safetensors" in again.stdout
    with safe_open(str(tmp_path / "out" / "again.safetensors"), "pt") as f:
        assert set(f.keys()) == set(keys)
    # without dim_from_weights, a file of another algorithm is refused naming the module and both algorithms
    wrong = run("wrong", 'network_dim = 4\nnetwork_args = ["algo=loha"]', 'network_weights = "out/lokr.safetensors"')
    assert wrong.returncode != 0
    assert "trained with algorithm 'lokr' in the file, this run uses 'loha'" in wrong.stdout + wrong.stderr


def test_cli_kohya_config_long_captions_and_clip_skip(kiln_env, base, tiny_sd1_path, tmp_path):
    """kohya's max_token_length = 225 with a ~180-token tag caption: every tag reaches the text encoder (no
    warning, the node reports the caption's full length); clip_skip = 2: CLIP layer -2 for training, the last
    CLIP layer gets no LoRA, ss_clip_skip / ss_max_token_length written."""
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(str(kiln_env.comfyui / "comfy" / "sd1_tokenizer"))
    data = make_dataset(tmp_path / "data", count=3)
    tags = [f"{c} {t}" for t in ("hair", "eyes", "dress", "ribbon", "shoes", "gloves", "hat", "scarf")
            for c in ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "grey")]
    caption = ", ".join(tags[:60])
    n = len(tokenizer(caption)["input_ids"]) - 2
    assert 170 <= n <= 200, n
    data["images"][0].with_suffix(".txt").write_text(caption, encoding="utf-8")
    write_dataset_config(tmp_path / "dataset.toml", data["image_dir"])
    (tmp_path / "train.toml").write_text(
        f'pretrained_model_name_or_path = "{tiny_sd1_path}"\ndataset_config = "dataset.toml"\noutput_dir = "out"\n'
        f'output_name = "long"\nmax_train_steps = 1\nlearning_rate = 1e-3\nmax_token_length = 225\nclip_skip = 2\n'
        f'network_module = "networks.lora"\nnetwork_dim = 2\nnetwork_alpha = 2\n')
    run = cli_config(kiln_env, base, tmp_path / "train.toml", "--set", "6.sample_steps=1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"max_token_length 225: the longest caption has {n} tokens" in run.stdout
    assert "longer than max_token_length" not in run.stdout + run.stderr
    with safe_open(str(tmp_path / "out" / "long.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["ss_max_token_length"], meta["ss_clip_skip"]) == ("225", "2")
    te = {k.split(".")[0] for k in keys if k.startswith("lora_te_")}  # kohya trains the encoder at learning_rate
    assert te and not any("_layers_11_" in k for k in te) and any("_layers_10_" in k for k in te)


def test_cli_kohya_sample_prompt_file_sets_size_and_seed_reproducibly(kiln_env, base, tiny_sd1_path, tmp_path):
    """kohya's sample_prompts file with --n/--w/--h/--d/--s: the saved preview has that size, and a second run
    gives the same pixels (seeded by --d, not by the run)."""
    import numpy as np
    from PIL import Image
    write_dataset_config(tmp_path / "dataset.toml", base / "input" / "kiln_demo" / "train" / "5_kiln toy")
    (tmp_path / "prompts.txt").write_text("# kohya prompt file\na kiln toy --n blurry, lowres --w 96 --h 64 --d 42 "
                                          "--s 2 --l 4\n", encoding="utf-8")
    (tmp_path / "train.toml").write_text(
        f'pretrained_model_name_or_path = "{tiny_sd1_path}"\ndataset_config = "dataset.toml"\noutput_dir = "out"\n'
        f'output_name = "prompted"\nmax_train_steps = 1\nlearning_rate = 1e-3\nnetwork_train_unet_only = true\n'
        f'sample_prompts = "prompts.txt"\nsample_sampler = "euler_a"\nseed = 3\n'
        f'network_module = "networks.lora"\nnetwork_dim = 2\nnetwork_alpha = 2\n')
    pixels = []
    for run_no in (1, 2):
        run = cli_config(kiln_env, base, tmp_path / "train.toml")
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        saved = sorted((base / "output").glob("prompted_sample_*.png"))
        assert len(saved) == run_no, saved
        with Image.open(saved[-1]) as im:
            assert im.size == (96, 64)
            pixels.append(np.asarray(im.convert("RGB")))
    assert np.array_equal(pixels[0], pixels[1]) and pixels[0].std() > 0


def test_cli_names_what_it_cannot_read_a_ckpt_without_family_and_a_diffusers_folder(kiln_env, base, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    diffusers = tmp_path / "sd15-diffusers"
    diffusers.mkdir()
    (diffusers / "model_index.json").write_text("{}")
    out = {}
    for name, ckpt in (("ckpt", "model.ckpt"), ("diffusers", "sd15-diffusers")):
        (tmp_path / f"{name}.toml").write_text(f'pretrained_model_name_or_path = "{ckpt}"\ndataset_config = "d.toml"\n'
                                               f'network_module = "networks.lora"\n')
        out[name] = cli_config(kiln_env, base, tmp_path / f"{name}.toml")
    assert out["ckpt"].returncode != 0 and "pass --family sd1, sdxl or sd3" in out["ckpt"].stderr
    assert "Traceback" not in out["ckpt"].stderr
    assert out["diffusers"].returncode != 0 and "is a Diffusers-format folder" in out["diffusers"].stderr


def cli_kohya(kiln_env, base, args, cwd, timeout=900):
    """``cli.py <kohya command args>`` started in ``cwd`` (kohya reads relative paths against it), on the CPU."""
    cmd = [kiln_env.python, str(REPO / "cli.py"), "--comfyui", str(kiln_env.comfyui), *map(str, args),
           "--", "--cpu", "--base-directory", str(base)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


@pytest.mark.slow
def test_cli_runs_kohyas_train_network_command_as_written(kiln_env, base, tiny_sd1_path, tmp_path):
    """sd-scripts docs/train_network.md's command pasted after cli.py, accelerate prefix and all: paths relative to
    the directory it starts in, 1 epoch instead of 10; the text encoder trains at learning_rate, as in kohya."""
    pytest.importorskip("bitsandbytes")  # the example uses AdamW8bit
    write_dataset_config(tmp_path / "my_dataset_config.toml", base / "input" / "kiln_demo" / "train" / "5_kiln toy")
    run = cli_kohya(kiln_env, base, command_args(TRAIN_NETWORK_COMMAND, pretrained_model_name_or_path=tiny_sd1_path,
                                                 max_train_epochs=1), tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "train_network.py: a sd1 run of KilnTrainSD1" in run.stdout
    assert "'accelerate launch --num_cpu_threads_per_process 1': the launcher's options are not used" in run.stdout
    assert "sdpa: no effect" in run.stdout
    with safe_open(str(tmp_path / "out" / "my_lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_mixed_precision"]) == ("16", "1.0", "fp16")
    assert meta["ss_optimizer"].endswith("AdamW8bit") and meta["ss_gradient_checkpointing"] == "True"
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)


@pytest.mark.slow
def test_cli_kohya_command_with_masked_loss_and_a_config_file(kiln_env, base, tiny_sd1_path, tmp_path):
    """kohya's masked loss (docs/masked_loss_README.md): --masked_loss with a dataset subset's
    conditioning_data_dir; --config_file merged under the command line (its network_dim loses to the flag); kohya's
    --save_every_n_steps series (the last step too) and --resume of kohya's state folder name."""
    data = make_dataset(tmp_path / "data", count=4)
    images, masks = data["image_dir"], data["mask_dir"]
    (tmp_path / "masked.toml").write_text(
        f'[general]\nresolution = 64\nbatch_size = 2\n[[datasets]]\n  [[datasets.subsets]]\n'
        f'  image_dir = "{images}"\n  caption_extension = ".txt"\n'
        f'  conditioning_data_dir = "{masks}"\n  num_repeats = 1\n')
    (tmp_path / "base.toml").write_text('[network_arguments]\nnetwork_module = "networks.lora"\nnetwork_dim = 8\n'
                                        'network_alpha = 2\n[training_arguments]\nmax_train_steps = 2\n')
    args = ["train_network.py", "--config_file=base", f"--pretrained_model_name_or_path={tiny_sd1_path}",
            "--dataset_config", "masked.toml", "--output_dir", "out", "--output_name", "masked", "--network_dim", "2",
            "--masked_loss", "--network_train_unet_only", "--learning_rate=1e-3", "--optimizer_args",
            "weight_decay=0.01", "betas=0.9,0.99", "--save_every_n_steps=1", "--save_state"]
    run = cli_kohya(kiln_env, base, args, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with safe_open(str(tmp_path / "out" / "masked.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_masked_loss"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("True", "2", "2.0")
    assert meta["ss_steps"] == "2" and "weight_decay=0.01" in meta["ss_optimizer"]
    assert sorted(p.name for p in (tmp_path / "out").glob("masked-step*")) == [
        "masked-step00000001.kiln-state", "masked-step00000001.safetensors", "masked-step00000002.kiln-state",
        "masked-step00000002.safetensors"]  # kohya's series, the last step included
    resumed = cli_kohya(kiln_env, base, args + ["--output_name=again", "--resume", "out/masked-step00000001-state"],
                        tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming exactly at step 1" in resumed.stdout
    # the same without --masked_loss: kohya's schema refuses conditioning_data_dir then, and so does Kiln
    refused = cli_kohya(kiln_env, base, [a for a in args if a != "--masked_loss"], tmp_path)
    assert refused.returncode != 0 and "add masked_loss = true" in refused.stderr


def test_cli_kohya_command_refuses_what_kohya_would_before_loading_anything(kiln_env, base, tmp_path):
    bad = cli_kohya(kiln_env, base, ["train_network.py", "--pretrained_model_name_or_path=m.safetensors",
                                     "--network_dimm=4"], tmp_path, timeout=120)
    assert bad.returncode != 0 and "Did you mean --network_dim?" in bad.stderr and "Traceback" not in bad.stderr
    several = cli_kohya(kiln_env, base, ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                                         "train_network.py", "--network_module=networks.lora"], tmp_path, timeout=120)
    assert several.returncode != 0 and "Put the launcher before cli.py" in several.stderr


@pytest.mark.slow
def test_cli_runs_kohyas_sdxl_command(kiln_env, base, tiny_sdxl_path, tmp_path):
    """docs/sdxl_train_network.md's command as written, 2 epochs instead of 10, with --network_train_unet_only, which
    kohya itself requires together with --cache_text_encoder_outputs (without it the command is refused, as kohya
    refuses it). The same text as a --config_file maps to the same graph (tests/unit/test_kohya_command_line.py), so
    this one run covers both."""
    pytest.importorskip("bitsandbytes")
    images = base / "input" / "kiln_demo" / "train" / "5_kiln toy"
    write_dataset_config(tmp_path / "my_sdxl_dataset_config.toml", images)
    args = command_args(SDXL_COMMAND, pretrained_model_name_or_path=tiny_sdxl_path, max_train_epochs=2)
    refused = cli_kohya(kiln_env, base, args, tmp_path)
    assert refused.returncode != 0 and "add network_train_unet_only = true" in refused.stderr
    run = cli_kohya(kiln_env, base, args + ["--network_train_unet_only"], tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "sdxl_train_network.py: a sdxl run of KilnTrainSDXL" in run.stdout and "epoch 2/2" in run.stdout
    with safe_open(str(tmp_path / "out" / "my_sdxl_lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_mixed_precision"]) == ("32", "16.0", "bf16")
    assert meta["ss_optimizer"].endswith("AdamW8bit") and meta["ss_lr_scheduler"] == "constant"
    assert meta["ss_gradient_checkpointing"] == "True" and meta["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert int(meta["ss_steps"]) == 2 * int(meta["ss_num_batches_per_epoch"]) and meta["ss_epoch"] == "2"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert (tmp_path / "out" / "my_sdxl_lora-000001.safetensors").is_file()
    # the script fixes the family: the SDXL checkpoint under train_network.py is refused, naming the right script
    wrong = cli_kohya(kiln_env, base, ["train_network.py", f"--pretrained_model_name_or_path={tiny_sdxl_path}",
                                       "--dataset_config=my_sdxl_dataset_config.toml", "--output_dir=out",
                                       "--network_module=networks.lora", "--max_train_steps=1"], tmp_path)
    assert wrong.returncode != 0 and "run sdxl_train_network.py instead" in wrong.stderr


@pytest.mark.slow
def test_cli_runs_kohyas_sd3_command(kiln_env, base, tiny_sd3_split, tmp_path):
    """docs/sd3_train_network.md's command: a checkpoint without text encoders plus separate --clip_l/--clip_g files
    (loaded by ComfyUI's DualCLIPLoader), 2 epochs instead of 10, 64² images, blocks_to_swap 2 (the fixture's every
    joint block; the doc's 32 is for SD3.5 Large's 38); left out: t5xxl (no T5-XXL fixture fits a test run, see
    tiny_models.build_sd3_split_files); added: --network_train_unet_only, because text-encoder LoRA through the
    fixture's full-size CLIP-G costs about a minute a step on 2 CPU cores (measured: 62-73 s vs 1-2 s without). The
    same text as a --config_file maps to the same graph (tests/unit/test_kohya_command_line.py)."""
    pytest.importorskip("bitsandbytes")
    write_dataset_config(tmp_path / "my_sd3_dataset_config.toml", base / "input" / "kiln_demo" / "train" / "5_kiln toy")
    args = command_args(SD3_COMMAND, pretrained_model_name_or_path=tiny_sd3_split["model"],
                        clip_l=tiny_sd3_split["clip_l"], clip_g=tiny_sd3_split["clip_g"], t5xxl=None,
                        max_train_epochs=2, blocks_to_swap=2, network_train_unet_only=True)
    run = cli_kohya(kiln_env, base, args, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "sd3_train_network.py: a sd3 run of KilnTrainSD3" in run.stdout and "epoch 2/2" in run.stdout
    with safe_open(str(tmp_path / "out" / "my_sd3_lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_mixed_precision"]) == ("16", "1.0", "fp16")
    assert meta["ss_optimizer"].endswith("AdamW8bit") and meta["ss_weighting_scheme"] == "uniform"
    assert int(meta["ss_steps"]) == 2 * int(meta["ss_num_batches_per_epoch"]) and meta["ss_epoch"] == "2"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    # the separate encoder files were loaded by ComfyUI's DualCLIPLoader (the checkpoint has none)
    assert "running node 3 DualCLIPLoader" in run.stdout
    assert "blocks_to_swap 2: 2 of 2 blocks kept in host memory" in run.stdout
    assert (tmp_path / "out" / "my_sd3_lora-000001.safetensors").is_file()


@pytest.mark.slow
def test_cli_runs_kohyas_train_db_command_with_folder_flags(kiln_env, base, tiny_sd1_path, tmp_path):
    """docs/train_db_README's command with --train_data_dir/--reg_data_dir (no dataset config): kohya's DreamBooth
    dataset from N_name folders, reg images balanced, --use_8bit_adam; 4 steps at 64² instead of 1600 at 512²."""
    pytest.importorskip("bitsandbytes")
    reg = make_dataset(tmp_path / "reg", seed=1, count=3)
    args = command_args(TRAIN_DB_FOLDERS_COMMAND, pretrained_model_name_or_path=tiny_sd1_path,
                        train_data_dir=base / "input" / "kiln_demo" / "train", reg_data_dir=reg["train_dir"],
                        resolution=64, max_train_steps=4)
    run = cli_kohya(kiln_env, base, args, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "train_db.py: a sd1 run of KilnTrainDreamBooth" in run.stdout
    assert "the dataset flags as a kohya dataset config:" in run.stdout
    with safe_open(str(tmp_path / "out" / "my_db.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert "model.diffusion_model.out.2.weight" in keys and meta["ss_steps"] == "4"
    assert int(meta["ss_num_reg_images"]) == 3 and meta["ss_optimizer"].endswith("AdamW8bit")
    assert meta["ss_resolution"] == "(64, 64)"
