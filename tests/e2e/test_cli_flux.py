"""cli.py runs kohya's flux_train_network.py: a --config TOML and a command line as kohya's docs write them, on the
tiny FLUX.1 dev fixture with its --clip_l and --ae files (tests/fixtures/tiny_models.py build_flux_side_files).

No --t5xxl: ComfyUI builds T5-XXL only at its full 4.7B size, so the tiny Flux takes CLIP-L's 768-wide states as its
context and the CLI conditions it with CLIP-L's plain encode (a note says so; a FLUX.1 file with T5-XXL's 4096-wide
txt_in is refused without t5xxl). Each run is one process on 2 CPU cores (about a minute), so there are two."""
from __future__ import annotations

import math
import os
import subprocess

import pytest
from safetensors import safe_open

from fixtures.datasets import make_dataset
from fixtures.kohya import FLUX_COMMAND, FLUX_EXAMPLE, command_args, with_keys, write_dataset_config
from test_sd1_workflow import REPO

pytestmark = pytest.mark.e2e

# what every run changes of kohya's example (tests/fixtures/kohya.py), and why: the fixture's files (no t5xxl, see
# above), test sizes, fp32 on the CPU, AdamW (bitsandbytes' 8-bit AdamW is optional),
# network_train_unet_only (kohya requires it with cache_text_encoder_outputs), blocks_to_swap 1 (a single block: the
# fixture has 1 double + 1 single; kohya's split of 1 is 0 double + 2 single blocks, capped at 1)
TEST_CHANGES = dict(t5xxl=None, max_train_epochs=None, max_train_steps=4, save_every_n_epochs=None,
                    save_every_n_steps=2, learning_rate=1e-2, optimizer_type="AdamW", network_dim=4, network_alpha=4,
                    mixed_precision="no", blocks_to_swap=1, network_train_unet_only=True)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_flux_paths, tiny_flux_side_files):
    """(ComfyUI base folder, a work folder with the dataset config, the changes naming the fixture's files)."""
    base = tmp_path_factory.mktemp("cli_flux")
    (base / "custom_nodes").mkdir()  # Kiln is not installed there: the CLI loads the pack it belongs to
    make_dataset(base / "input" / "kiln_demo")
    work = tmp_path_factory.mktemp("flux_work")
    write_dataset_config(work / "my_flux_dataset_config.toml", base / "input" / "kiln_demo" / "train" / "5_kiln toy")
    files = dict(pretrained_model_name_or_path=tiny_flux_paths("flux-dev"), clip_l=tiny_flux_side_files["clip_l"],
                 ae=tiny_flux_side_files["ae"])
    return base, work, {**TEST_CHANGES, **files}


def run_cli(kiln_env, base, args, cwd):
    """``cli.py <args>`` started in ``cwd`` (kohya reads relative paths against it), on the CPU."""
    cmd = [kiln_env.python, str(REPO / "cli.py"), "--comfyui", str(kiln_env.comfyui), *map(str, args),
           "--", "--cpu", "--base-directory", str(base)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(cwd),
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def saved(path):
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}, f.metadata()


def test_cli_runs_kohyas_flux_config(kiln_env, flux_run):
    base, work, changes = flux_run
    (work / "flux.toml").write_text(with_keys(FLUX_EXAMPLE, **changes))
    run = run_cli(kiln_env, base, ["--config", work / "flux.toml"], work)
    out = run.stdout
    assert "a flux run of KilnTrainFlux" in out and "running node 1 UNETLoader" in out
    assert "running node 10 VAELoader" in out and "note: no t5xxl" in out and "step 4/4" in out
    assert "blocks_to_swap 1: 1 of 2 blocks kept in host memory" in out
    modules, meta = saved(work / "out" / "my_flux_lora.safetensors")
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= modules
    assert all(m.startswith("lora_unet_") for m in modules)  # network_train_unet_only
    assert (meta["ss_network_module"], meta["ss_model_type"], meta["modelspec.architecture"]) == \
        ("networks.lora_flux", "flux", "flux-1-dev/lora")
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"], meta["ss_model_prediction_type"],
            meta["ss_guidance_scale"], meta["ss_network_dim"], meta["ss_steps"]) == \
        ("shift", "3.1582", "raw", "1.0", "4", "4")
    # 4 steps map the config; whether Flux learns is test_flux_workflow's and test_train_flux's to show
    assert all(math.isfinite(float(meta[k])) for k in ("kiln_probe_loss_start", "kiln_probe_loss_end"))
    assert (work / "out" / "my_flux_lora-step00000002.safetensors").is_file()


def test_cli_runs_kohyas_flux_command_line(kiln_env, flux_run):
    """The command as kohya's docs write it, with network_args choosing the single blocks only."""
    base, work, changes = flux_run
    args = command_args(FLUX_COMMAND, **{**changes, "output_name": "cmd_flux_lora", "save_every_n_steps": None,
                                          "network_args": ["train_double_block_indices=none"]})
    run = run_cli(kiln_env, base, args, work)
    assert "flux_train_network.py: a flux run of KilnTrainFlux" in run.stdout and "DualCLIPLoader" not in run.stdout
    modules, meta = saved(work / "out" / "cmd_flux_lora.safetensors")
    assert modules == {"lora_unet_single_blocks_0_" + s for s in ("linear1", "linear2", "modulation_lin")}
    assert (meta["ss_timestep_sampling"], meta["ss_model_prediction_type"], meta["ss_guidance_scale"]) == \
        ("flux_shift", "raw", "1.0")
