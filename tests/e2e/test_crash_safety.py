"""Crash safety (issue 17): SIGKILL the server in the middle of a run with save_every_n_steps, restart it, and check
that every file Kiln wrote is complete or absent, that the last intermediate resumes, and that a damaged cache
entry is encoded again with a warning."""
from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fixtures.datasets import make_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
API = json.loads((REPO / "example_workflows" / "api" / "sd1_lora.json").read_text())


def loadable(path: Path) -> None:
    """Raises unless ``path`` is a complete safetensors file (every tensor read) or a readable .kiln-state."""
    if path.suffix == ".kiln-state":
        torch.load(path, weights_only=True)
        return
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            f.get_tensor(k)


def test_sigkill_mid_run_leaves_only_complete_files_and_resumes(new_comfy_server, tiny_sd1_path, tmp_path):
    base = tmp_path / "server"
    server = new_comfy_server(base)
    try:
        ckpt = server.install(tiny_sd1_path, "checkpoints")
        make_dataset(server.input_dir / "crash")
        wf = copy.deepcopy(API)
        wf["1"]["inputs"]["ckpt_name"] = ckpt
        wf["2"]["inputs"]["folder"] = "crash/train"
        wf["6"]["inputs"].update(steps=12, sample_every=0, sample_steps=1, save_every_n_steps=1, save_name="kiln/crash")
        wf["7"]["inputs"]["filename"] = "kiln/crash_final"
        server.post_prompt(copy.deepcopy(wf))
        folder = server.loras_dir / "kiln"
        deadline = time.monotonic() + 600
        while len(list(folder.glob("crash-step*.safetensors"))) < 3:
            assert time.monotonic() < deadline and server.process.poll() is None, server.log_tail()
            time.sleep(0.05)
        os.killpg(server.process.pid, signal.SIGKILL)  # mid-run, likely mid-write
        server.process.wait(timeout=30)
    except BaseException:
        server.stop()
        raise

    cache = base / "user" / "__kiln_cache"
    written = [p for p in list(server.loras_dir.rglob("*")) + list(cache.rglob("*"))
               if p.is_file() and not p.name.startswith(".kiln-")]
    assert any(p.suffix == ".kiln-state" for p in written) and any(cache.rglob("*.safetensors"))
    umask = os.umask(0o022)
    os.umask(umask)  # the server inherited this process's umask
    for p in written:
        loadable(p)  # complete or absent: never a half-written file under a real name
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p  # readable by others, as a plain open() makes it
    steps = sorted(int(p.stem.rsplit("step", 1)[1]) for p in folder.glob("crash-step*.safetensors")
                   if p.with_suffix(".kiln-state").is_file())
    last = steps[-1]
    damaged = sorted((cache / "latents").glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])

    server = new_comfy_server(base)
    try:
        wf["6"]["inputs"]["resume_from"] = f"kiln/crash-step{last:08d}.safetensors"
        entry = server.wait(server.post_prompt(wf), timeout=900)
        train_text = "".join(entry["outputs"]["6"]["text"])
        assert f"resuming exactly at step {last}" in train_text, train_text
        assert "1 encoded" in "".join(entry["outputs"]["4"]["text"])
        assert f"cache file {damaged}" in server.log_text() and "unreadable" in server.log_text()
        loadable(folder / "crash_final.safetensors")
        # the next write into each folder removed the dead server's temp files
        assert not list(folder.glob(".kiln-*")) and not list((cache / "latents").glob(".kiln-*"))
    finally:
        server.stop()
