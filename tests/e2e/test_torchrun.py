"""cli.py under torchrun: 2 processes (gloo, --cpu) with batch 2 each train the LoRA that 1 process trains with
batch 4 on the tiny SD1 fixture (same samples, noise and timesteps: trainer_core/training/distributed.py), rank 0 alone
saves (rank 1 runs only what feeds the Train node), the latent cache is shared out through the disk cache, and the
metadata records the world size and the total batch."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from fixtures.datasets import make_dataset
from test_sd1_workflow import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# SGD: its step is linear in the gradient, so the two runs' float rounding (batch 4 vs 2 x 2 and an all-reduce)
# stays at float level; Adam divides by √v, which turns the rounding of gradients that nearly cancel into up to
# ~1 % of a step (measured 4.5e-5 on weights of 6e-3 after 3 AdamW steps)
SETTINGS = ["6.optimizer=SGDNesterov", "6.learning_rate=0.5", "6.steps=3", "6.sample_every=0", "6.sample_steps=1", "6.save_every_n_steps=2", "6.save_name=kiln/dist_ckpt",
            "7.filename=kiln/dist", "7.precision=fp32"]


def base_dir(root, tiny_sd1_path):
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "checkpoints" / tiny_sd1_path.name).symlink_to(tiny_sd1_path)
    (root / "custom_nodes").mkdir()
    make_dataset(root / "input" / "kiln_demo")
    return root


def launch(kiln_env, base, procs: int, batch_size: int, workflow="sd1_lora.json", settings=SETTINGS):
    runner = [kiln_env.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [kiln_env.python]
    sets = [a for s in settings + [f"2.batch_size={batch_size}"] for a in ("--set", s)]
    cmd = runner + [str(REPO / "cli.py"), "--comfyui", str(kiln_env.comfyui), "--workflow",
                    str(REPO / "example_workflows" / "api" / workflow), *sets,
                    "--", "--cpu", "--base-directory", str(base)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd="/", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    return run


def test_two_processes_train_the_lora_of_one_process_with_the_double_batch(kiln_env, tiny_sd1_path, tmp_path):
    one_base, two_base = base_dir(tmp_path / "one", tiny_sd1_path), base_dir(tmp_path / "two", tiny_sd1_path)
    one = launch(kiln_env, one_base, 1, 4)
    two = launch(kiln_env, two_base, 2, 2)
    out = two.stdout
    assert "[kiln] 2 processes (gloo)" in out and "[kiln] done" in out
    # rank 1 ran the loaders, the cache and the Train node, never Save LoRA (7) or the previews (8, 9)
    rank1 = next(line for line in out.splitlines() if line.startswith("[kiln rank 1] done"))
    assert set(rank1.split("ran nodes ")[1].split(" (")[0].split(", ")) == {"1", "2", "3", "4", "5", "6"}
    assert out.count("[kiln]   step 3/3") == 1  # one progress report: rank 0's
    # the disk cache was shared out: rank 0 encoded every other latent and read the ones rank 1 wrote
    cache = re.search(r"(\d+) latents: (\d+) encoded, 0 reused from memory, (\d+) from the disk cache", out)
    assert cache and cache.groups() == ("8", "4", "4"), out[-3000:]
    assert "8 latents: 8 encoded, 0 reused from memory, 0 from the disk cache" in one.stdout
    loras = [os.path.relpath(os.path.join(d, f), two_base / "models" / "loras")
             for d, _, fs in os.walk(two_base / "models" / "loras") for f in fs]
    assert sorted(loras) == ["kiln/dist.safetensors", "kiln/dist_ckpt-step00000002.kiln-state",
                             "kiln/dist_ckpt-step00000002.safetensors"]
    a = load_file(str(one_base / "models" / "loras" / "kiln" / "dist.safetensors"))
    b = load_file(str(two_base / "models" / "loras" / "kiln" / "dist.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    trained = max(float(a[k].abs().max()) for k in a if k.endswith("lora_up.weight"))  # up starts at 0: all trained
    print(f"max |LoRA(2 processes, batch 2) - LoRA(1 process, batch 4)| = {diff:.3g}; largest lora_up value "
          f"{trained:.3g}", file=sys.stderr)
    assert trained > 1e-3 and diff <= 1e-5 * trained, (diff, trained)
    with safe_open(str(two_base / "models" / "loras" / "kiln" / "dist.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["kiln_world_size"] == "2" and meta["ss_total_batch_size"] == "4" and meta["ss_batch_size_per_device"] == "2"
    with safe_open(str(one_base / "models" / "loras" / "kiln" / "dist.safetensors"), "pt") as f:
        assert f.metadata()["ss_total_batch_size"] == "4" and f.metadata()["kiln_world_size"] == "1"
    for run in (one, two):
        print(next(line for line in run.stdout.splitlines() if "s/step" in line), file=sys.stderr)


DREAMBOOTH = ["6.optimizer=SGDNesterov", "6.learning_rate=0.05", "6.steps=2", "6.fused_backward_pass=false",
              "6.sample_every=0", "6.sample_steps=1", "7.filename=kiln/dist_db", "2.regularization_folder="]


def test_two_processes_fine_tune_the_model_of_one_process_with_the_double_batch(kiln_env, tiny_sd1_path, tmp_path):
    """Train DreamBooth under torchrun: every UNet weight trains, gradients all-reduced in buckets; rank 0 alone
    samples and writes the checkpoint (Save Checkpoint is not an input of the Train node, so rank 1 never runs it)."""
    one_base, two_base = base_dir(tmp_path / "one", tiny_sd1_path), base_dir(tmp_path / "two", tiny_sd1_path)
    one = launch(kiln_env, one_base, 1, 4, "sd1_dreambooth_full.json", DREAMBOOTH)
    two = launch(kiln_env, two_base, 2, 2, "sd1_dreambooth_full.json", DREAMBOOTH)
    rank1 = next(line for line in two.stdout.splitlines() if line.startswith("[kiln rank 1] done"))
    assert set(rank1.split("ran nodes ")[1].split(" (")[0].split(", ")) == {"1", "2", "3", "4", "6"}
    saved = {os.path.relpath(os.path.join(d, f), two_base / "models" / "checkpoints")
             for d, _, fs in os.walk(two_base / "models" / "checkpoints") for f in fs}
    assert saved == {"kiln/dist_db.safetensors", tiny_sd1_path.name}
    base = load_file(str(tiny_sd1_path))
    a = load_file(str(one_base / "models" / "checkpoints" / "kiln" / "dist_db.safetensors"))
    b = load_file(str(two_base / "models" / "checkpoints" / "kiln" / "dist_db.safetensors"))
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert unet and a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in unet)
    moved = max(float((a[k].float() - base[k].float()).abs().max()) for k in unet)
    print(f"max |UNet(2 processes, batch 2) - UNet(1 process, batch 4)| = {diff:.3g}; largest change from the base "
          f"{moved:.3g}", file=sys.stderr)
    assert moved > 1e-4 and diff <= 1e-5 * moved, (diff, moved)
    with safe_open(str(two_base / "models" / "checkpoints" / "kiln" / "dist_db.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["kiln_world_size"] == "2" and meta["ss_total_batch_size"] == "4"
