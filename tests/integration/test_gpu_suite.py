"""bench/gpu_suite.sh's dry run: every step of the GPU suite at tiny sizes on the CPU, against the provisioned
ComfyUI, so that the suite a lent GPU runs (issue 23; bench/README.md) cannot rot between GPU sessions."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = {"correctness", "dynamic_vram", "compare_native", "train_overhead", "memory"}


def suite(kiln_env, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_TEST_GPU", "OUT")}
    env.update(KILN_PYTHON=kiln_env.python, KILN_COMFYUI=str(kiln_env.comfyui))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=900)
    report = out / "gpu_suite.json"
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report.read_text())


@pytest.mark.slow  # ~55 s: every bench step in a subprocess; bench code, not a product module
def test_dry_run_runs_every_step_and_reports_their_figures(kiln_env, tmp_path):
    proc, report = suite(kiln_env, tmp_path)
    steps = {s["step"]: s for s in report["steps"]}
    assert set(steps) == STEPS and report["dry_run"]
    log = (tmp_path / "gpu_suite.log").read_text()
    failed = {n: s["summary"] for n, s in steps.items() if s["status"] != "ok"}
    assert not failed, f"{failed}\n{log[-6000:]}"
    assert proc.returncode == 0 and report["rerun"] == ""

    assert steps["correctness"]["figures"]["collected"] >= 20  # the GPU's selection resolves here
    assert steps["dynamic_vram"]["figures"]["counts"].get("passed", 0) >= 1
    (native,) = steps["compare_native"]["figures"].values()
    assert native["runs"]["kiln"]["seconds_per_step"] > 0 and native["runs"]["native"]["seconds_per_step"] > 0
    (overhead,) = steps["train_overhead"]["figures"].values()
    assert {r["checkpointing"] for r in overhead} == {False, True} and all(r["kiln_it_s"] > 0 for r in overhead)
    (memory,) = steps["memory"]["figures"].values()
    assert [r["blocks_to_swap"] for r in memory] == [0, memory[0]["blocks"]] and all(r["s_step"] > 0 for r in memory)

    env = report["environment"]
    assert env["torch"] and list(env["comfyui"].values()) == [str(kiln_env.comfyui.resolve())]
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "(dry run, CPU)" in table and all(f"| {name} |" in table for name in STEPS)
    assert report["seconds"] < report["budget_s"]
    print(f"gpu suite dry run: {report['seconds']} s")


def test_a_step_that_does_not_fit_the_budget_is_named_for_the_next_call(kiln_env, tmp_path):
    proc, report = suite(kiln_env, tmp_path, "--only", "memory,train_overhead", "--budget", "20")
    assert proc.returncode == 1
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("train_overhead", "not_run"), ("memory", "not_run")]
    version = report["steps"][0]["comfyui"]
    assert report["rerun"] == f"train_overhead@{version},memory@{version}"
    assert f"--only {report['rerun']}" in (tmp_path / "gpu_suite.md").read_text()


def test_an_unknown_step_is_refused_by_name(kiln_env, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry-run", "--only", "speed", "--out",
                           str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "KILN_PYTHON": kiln_env.python, "KILN_COMFYUI": str(kiln_env.comfyui)})
    assert proc.returncode == 2 and "unknown step(s) ['speed']" in proc.stderr
