"""Kiln's GPU suite: every check a lent GPU must make, each step in its own processes with its own time budget,
the whole run inside one device call; one JSON file, a markdown table and the steps' logs come out.

    python bench/gpu_suite.py --comfyui TREE[,TREE] [--out DIR] [--only STEP[,STEP]] [--budget S] [--dry-run]

Run it through bench/gpu_suite.sh, which prepares the carried environment on the GPU machine (bench/gpu_carry.sh
makes what travels; bench/README.md gives the device calls). Steps run in PLAN's order, on the ComfyUI trees given
(the oldest first). A step starts only when its whole budget fits in what is left of --budget, since a step cut
short measures little; otherwise it is recorded as not_run. The JSON's "rerun" is the --only value that runs
every step which did not pass. A failed or timed-out step never stops the next.

--dry-run runs every step at tiny sizes on the CPU (the test fixtures' shapes, one or two optimizer steps), so
the suite's plumbing is tested on every CI run (tests/integration/test_gpu_suite.py). Its correctness step only
collects the tests it would run on the GPU: the CPU suite runs those tests anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_report  # noqa: E402

# Each names what it proves on CUDA (tests/conftest.py lets ComfyUI pick the GPU under KILN_TEST_GPU=1).
CORRECTNESS = [
    "tests/integration/test_train_sd1.py",       # precision auto = bf16 autocast on CUDA; input MODEL samples
                                                  # bit-identical latents after training; exact resume
    "tests/integration/test_train_precisions.py",  # bf16 and fp16 (GradScaler) autocast through the Train node
    "tests/integration/test_memory_options.py",  # blocks_to_swap (side-stream prefetch) gradients bit-identical to
                                                  # no swap; gradient checkpointing recomputes; offload checkpointing
    "tests/integration/test_fp8_base.py",        # fp8 base weights
    "tests/integration/test_train_sdxl.py",
    "tests/integration/test_train_sd3.py",
]
DYNAMIC_VRAM_TEST = "tests/integration/test_dynamic_vram.py"
DYNAMIC_TEST_NAME = "test_dynamic_model_trains_like_a_classic_one"
BUDGET = 540  # seconds: a device command may run 600

# (step, which ComfyUI trees): the order is the priority when one call cannot hold every step.
PLAN = [("correctness", "oldest"), ("dynamic_vram", "newest"), ("compare_native", "oldest"),
        ("compare_native", "newest"), ("train_overhead", "oldest"), ("memory", "oldest"),
        ("train_overhead", "newest"), ("memory", "newest"), ("correctness", "newest")]


@dataclass
class Ctx:
    python: str
    dry: bool
    work: Path
    pytest_timeout: bool  # pytest-timeout is installed: a hung test fails alone instead of eating the budget


@dataclass
class Cmd:
    label: str
    argv: list[str]
    env: dict = field(default_factory=dict)
    json: Path | None = None  # what the command writes, read by the step's evaluation


@dataclass
class Tree:
    path: Path
    version: str

    @property
    def key(self) -> tuple:
        return tuple(int(x) if x.isdigit() else 0 for x in self.version.split("."))


def comfyui_version(tree: Path) -> str:
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (tree / "comfyui_version.py").read_text())
    return m.group(1) if m else "unknown"


# --- commands of each step ------------------------------------------------------------------------------------

def pytest(ctx: Ctx, *args: str) -> list[str]:
    return [ctx.python, "-m", "pytest", "-c", "tests/pytest.ini", "--rootdir", "tests", "-p", "no:cacheprovider",
            *args]


def bench(ctx: Ctx, script: str, name: str, *args: str) -> Cmd:
    out = ctx.work / f"{name}.json"
    return Cmd(name, [ctx.python, f"bench/{script}", *args, "--json", str(out)], json=out)


def correctness_cmds(ctx: Ctx, tree: Tree) -> list[Cmd]:
    if ctx.dry:
        return [Cmd("collect", pytest(ctx, "--collect-only", "-q", *CORRECTNESS))]
    timeout = ["--timeout", "150"] if ctx.pytest_timeout else []
    return [Cmd("pytest", pytest(ctx, "-v", "-rs", *timeout, *CORRECTNESS), env={"KILN_TEST_GPU": "1"})]


def dynamic_vram_cmds(ctx: Ctx, tree: Tree) -> list[Cmd]:
    if ctx.dry:  # the CPU suite runs the private-copy test; here one quick test proves the step's plumbing
        cmds = [Cmd("pytest", pytest(ctx, "-v", "-s", "-rs", DYNAMIC_VRAM_TEST, "-k", "not private_copy"))]
    else:
        cmds = [Cmd("pytest", pytest(ctx, "-v", "-s", "-rs", DYNAMIC_VRAM_TEST), env={"KILN_TEST_GPU": "1"})]
    if tree.key >= (0, 16):  # ComfyUI records its loaders (what the non-dynamic delegate re-loads) from 0.16 on
        size = ["--steps", "1"] if ctx.dry else ["--device", "cuda", "--shape", "real", "--steps", "5"]
        cmds.append(bench(ctx, "private_copy_cost.py", f"private_copy_cost-{tree.version}", *size))
    return cmds


def compare_native_cmds(ctx: Ctx, tree: Tree) -> list[Cmd]:
    if ctx.dry:  # one process for both trainers: the subprocess mode would double the set-up on 2 cores
        return [bench(ctx, "compare_native.py", f"compare_native-{tree.version}-b1", "--steps", "1", "--warmup", "1",
                      "--batch", "1", "--rank", "4", "--mode", "single", "--retries", "0", "--threads", "1")]
    return [bench(ctx, "compare_native.py", f"compare_native-{tree.version}-b{b}", "--device", "cuda", "--shape",
                  "real", "--resolution", "512", "--batch", str(b), "--rank", "16", "--precision", "bf16",
                  "--steps", "20", "--warmup", "3", "--retries", "0") for b in (1, 4)]


def train_overhead_cmds(ctx: Ctx, tree: Tree) -> list[Cmd]:
    size = (["--families", "sd3", "--shape", "fixture", "--resolution", "64", "--steps", "1", "--warmup", "1",
             "--rank", "4"] if ctx.dry else [])  # GPU: its defaults, SDXL and SD3-medium at 1024², bf16, rank 32
    cmds = [bench(ctx, "train_overhead.py", f"train_overhead-{tree.version}", *size)]
    if not ctx.dry:  # FLUX.1 dev (12B, 24 GB in bf16) at 1024² with checkpointing, as it is trained on one GPU; the
        #              CPU runs its fixture shape (bench/README.md), too slow for the dry run at 0.3.75's width
        cmds.append(bench(ctx, "train_overhead.py", f"train_overhead-{tree.version}-flux", "--families", "flux",
                          "--checkpointing", "on", "--steps", "5", "--warmup", "2"))
    return cmds


def memory_cmds(ctx: Ctx, tree: Tree) -> list[Cmd]:
    size = (["--families", "sd3", "--counts", "0,all", "--steps", "1", "--warmup", "1", "--rank", "4"]
            if ctx.dry else [])  # GPU: its defaults, SDXL, SD3-medium, SD3.5-Large at 1024², swap 0/8/16/all
    return [bench(ctx, "memory.py", f"memory-{tree.version}", *size)]


# --- what each step's output says ---------------------------------------------------------------------------

PYTEST_LINE = re.compile(r"^(\S+\.py::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
PYTEST_SKIP = re.compile(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$", re.M)
PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_outcome(log: str) -> dict:
    """Per-test results from `pytest -v` lines (they are printed as the tests finish, so a run cut short still
    tells what it did), the skip reasons from -rs, and the closing line's counts."""
    results = dict(PYTEST_LINE.findall(log))
    counts: dict[str, int] = {}
    for status in results.values():
        counts[status.lower()] = counts.get(status.lower(), 0) + 1
    return {"counts": counts, "failed": sorted(t for t, s in results.items() if s in ("FAILED", "ERROR")),
            "skipped": sorted(set(PYTEST_SKIP.findall(log))), "results": results}


def evaluate_correctness(ctx: Ctx, tree: Tree, runs: list[dict]) -> dict:
    log = runs[0]["output"]
    if ctx.dry:
        m = re.search(r"(\d+) tests? collected", log)
        n = int(m.group(1)) if m else 0
        ok = runs[0]["rc"] == 0 and n > 0
        return {"ok": ok, "figures": {"collected": n},
                "summary": f"{n} tests collected (dry run: collection only; the CPU suite runs them)",
                "reduced": "collect-only"}
    out = pytest_outcome(log)
    passed = out["counts"].get("passed", 0)
    ok = runs[0]["rc"] == 0 and passed > 0
    summary = ", ".join(f"{v} {k}" for k, v in sorted(out["counts"].items())) or "no test ran"
    if out["failed"]:
        summary += "; failed: " + ", ".join(out["failed"])
    return {"ok": ok, "figures": {k: out[k] for k in ("counts", "failed", "skipped")}, "summary": summary}


PEAKS = re.compile(r"peak VRAM: classic (\d+) MiB, dynamic (\d+) MiB")


def evaluate_dynamic_vram(ctx: Ctx, tree: Tree, runs: list[dict]) -> dict:
    out = pytest_outcome(runs[0]["output"])
    figures = {k: out[k] for k in ("counts", "failed", "skipped")}
    dynamic = next((s for t, s in out["results"].items() if DYNAMIC_TEST_NAME in t), None)
    ok = runs[0]["rc"] == 0 and not out["failed"]
    notes = []
    if not ctx.dry and dynamic != "PASSED":  # the point of this step on a GPU: the test must run there, not skip
        ok = False
        notes.append(f"{DYNAMIC_TEST_NAME}: {dynamic or 'did not run'}")
    m = PEAKS.search(runs[0]["output"])
    if m:
        figures["peak_vram_mib"] = {"classic": int(m.group(1)), "dynamic": int(m.group(2))}
        notes.append(f"peak VRAM classic {m.group(1)} MiB, dynamic {m.group(2)} MiB")
    if len(runs) > 1:
        cost = runs[1].get("result")
        ok = ok and runs[1]["rc"] == 0 and cost is not None
        if cost:
            figures["delegate"] = cost
            notes.append(f"delegate: {cost['copy_seconds']} s to re-load, {cost['host_bytes_per_weight_byte']} host "
                         f"bytes per weight byte, step ×{cost['step_ratio_copy_vs_in_place']}")
    else:
        notes.append(f"no delegate cost: ComfyUI {tree.version} has no dynamic VRAM (< 0.16)")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(out["counts"].items())) or "no test ran"
    result = {"ok": ok, "figures": figures, "summary": "; ".join([counts, *notes])}
    if ctx.dry:
        result["reduced"] = "the private-copy test deselected (the CPU suite runs it)"
    return result


def evaluate_bench(ctx: Ctx, tree: Tree, runs: list[dict]) -> dict:
    ok = all(r["rc"] == 0 and r.get("result") is not None for r in runs)
    figures = {r["label"]: r.get("result") for r in runs}
    step = {"step": runs[0]["label"].split("-", 1)[0], "comfyui": tree.version, "figures": figures}
    return {"ok": ok, "figures": figures, "summary": gpu_report.bench_summary(figures),
            "targets": [] if ctx.dry else gpu_report.targets(step)}


STEPS = {  # name: (commands, evaluation, GPU budget s, dry-run budget s)
    "correctness": (correctness_cmds, evaluate_correctness, 240, 60),
    "dynamic_vram": (dynamic_vram_cmds, evaluate_dynamic_vram, 120, 90),
    "compare_native": (compare_native_cmds, evaluate_bench, 180, 120),
    "train_overhead": (train_overhead_cmds, evaluate_bench, 180, 60),
    "memory": (memory_cmds, evaluate_bench, 150, 60),
}


# --- running ------------------------------------------------------------------------------------------------

def clean_output(raw: bytes, limit: int = 400_000) -> str:
    """The log as text: progress bars' carriage-return redraws reduced to their last state, the tail kept."""
    text = raw.decode("utf-8", "replace")
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return text if len(text) <= limit else "[... cut ...]\n" + text[-limit:]


def run_cmd(cmd: Cmd, env: dict, timeout: float, log_path: Path) -> dict:
    """Run one command in its own process group; past ``timeout`` the whole group is ended (TERM, then KILL)."""
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd.argv, cwd=REPO, env={**env, **cmd.env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
    run = {"label": cmd.label, "argv": cmd.argv, "env": cmd.env, "rc": rc, "timed_out": timed_out,
           "seconds": round(time.monotonic() - t0, 1), "output": clean_output(log_path.read_bytes())}
    if cmd.json is not None and cmd.json.is_file():
        run["result"] = json.loads(cmd.json.read_text())
    return run


def run_step(ctx: Ctx, name: str, tree: Tree, budget: float, env: dict, log) -> dict:
    commands, evaluate, _, _ = STEPS[name]
    step = {"step": name, "comfyui": tree.version, "budget_s": round(budget), "runs": []}
    t0 = time.monotonic()
    step_env = {**env, "KILN_COMFYUI": str(tree.path), "KILN_PYTHON": ctx.python}
    for i, cmd in enumerate(commands(ctx, tree)):
        left = budget - (time.monotonic() - t0)
        if left < 5:
            step["runs"].append({"label": cmd.label, "argv": cmd.argv, "rc": None, "timed_out": True, "seconds": 0,
                                 "output": "not started: the step's budget was spent"})
            continue
        run = run_cmd(cmd, step_env, left, ctx.work / f"{name}-{tree.version}-{i}.log")
        log.write(f"\n===== {name}@{tree.version} {run['label']}: rc {run['rc']}, {run['seconds']} s"
                  f"{' (TIMED OUT)' if run['timed_out'] else ''}\n$ {' '.join(run['argv'])}\n{run['output']}\n")
        log.flush()
        step["runs"].append(run)
    step["seconds"] = round(time.monotonic() - t0, 1)
    try:
        step.update(evaluate(ctx, tree, step["runs"]))
    except Exception as e:  # an output the evaluation did not expect is a failed step, not a failed suite
        step.update(ok=False, figures={}, summary=f"evaluation failed: {type(e).__name__}: {e}")
    timed_out = any(r["timed_out"] for r in step["runs"])
    step["status"] = "timeout" if timed_out else "ok" if step.pop("ok") else "failed"
    for run in step["runs"]:  # the JSON keeps the end of each log; the whole log is gpu_suite.log
        run["output_tail"] = run.pop("output")[-3000:]
    return step


def environment(ctx: Ctx, trees: list[Tree]) -> dict:
    """GPU, driver, torch and ComfyUI versions, read in a child process so this one holds no CUDA context."""
    probe = ("import json, platform, os, torch; c = torch.cuda.is_available(); print(json.dumps({'python': "
             "platform.python_version(), 'torch': torch.__version__, 'cuda_runtime': torch.version.cuda, "
             "'cuda_available': c, 'gpu': torch.cuda.get_device_name() if c else None, 'gpu_memory_mib': "
             "torch.cuda.get_device_properties(0).total_memory // 2**20 if c else None, 'cpus': os.cpu_count()}))")
    env = {"comfyui": {t.version: str(t.path) for t in trees}, "dry_run": ctx.dry}
    try:
        out = subprocess.run([ctx.python, "-c", probe], capture_output=True, text=True, timeout=120)
        env.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except Exception as e:
        env["probe_error"] = f"{type(e).__name__}: {e}"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        m = re.search(r",\s*([\d.]+),", q.stdout)
        env["driver"] = m.group(1) if m else None
    manifest = REPO / ".gpu-carry" / "manifest.json"
    if manifest.is_file():  # what bench/gpu_carry.sh packed, and from which commit
        env["carry"] = json.loads(manifest.read_text())
    try:
        env["kiln_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["kiln_commit"] = None
    env["kiln_commit"] = env["kiln_commit"] or env.get("carry", {}).get("kiln_commit")
    return env


def planned(trees: list[Tree], only: list[str] | None) -> list[tuple[str, Tree]]:
    """PLAN resolved against the trees (duplicates dropped), filtered by --only's NAME or NAME@VERSION-prefix."""
    steps: list[tuple[str, Tree]] = []
    for name, which in PLAN:
        tree = trees[0] if which == "oldest" else trees[-1]
        if (name, tree) not in steps:
            steps.append((name, tree))
    if only:
        def wanted(name, tree):
            return any(o == name or (o.startswith(name + "@") and tree.version.startswith(o.split("@", 1)[1]))
                       for o in only)
        steps = [(n, t) for n, t in steps if wanted(n, t)]
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="comma list of ComfyUI trees (each is run where PLAN says)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / ".kiln" / "gpu-suite"),
                    help="where gpu_suite.json, .md and .log go (default $OUT, else .kiln/gpu-suite)")
    ap.add_argument("--only", default="", help=f"comma list of steps ({', '.join(STEPS)}), each optionally @VERSION")
    ap.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run, set-up included")
    ap.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, removed after)")
    args = ap.parse_args(argv)
    start = float(os.environ.get("KILN_SUITE_T0") or time.time())  # gpu_suite.sh's set-up counts against the budget
    deadline = time.monotonic() + args.budget - (time.time() - start)

    only = [o for o in args.only.split(",") if o]
    unknown = [o for o in only if o.split("@")[0] not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}: choose from {', '.join(STEPS)}")
    trees = sorted((Tree(Path(p).resolve(), comfyui_version(Path(p))) for p in args.comfyui.split(",") if p),
                   key=lambda t: t.key)
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    import importlib.util
    ctx = Ctx(sys.executable, args.dry_run, work, importlib.util.find_spec("pytest_timeout") is not None)
    env = {k: v for k, v in os.environ.items() if k != "KILN_TEST_GPU"}
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU run, even on a machine with a GPU

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"suite": "kiln-gpu-suite", "schema": 1, "dry_run": args.dry_run, "budget_s": args.budget,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
              "only": only, "environment": environment(ctx, trees), "steps": []}
    with open(out / "gpu_suite.log", "w") as log:
        for name, tree in planned(trees, only):
            budget = STEPS[name][3 if args.dry_run else 2]
            left = deadline - time.monotonic()
            if left < budget:
                result["steps"].append({"step": name, "comfyui": tree.version, "status": "not_run", "budget_s": budget,
                                        "summary": f"not run: {left:.0f} s left of the call's budget, the step "
                                                   f"needs {budget} s; rerun it with --only"})
                continue
            print(f"[gpu suite] {name}@{tree.version} (budget {budget} s, {left:.0f} s left)", flush=True)
            step = run_step(ctx, name, tree, budget, env, log)
            print(f"[gpu suite] {name}@{tree.version}: {step['status']} in {step['seconds']} s: {step['summary']}",
                  flush=True)
            result["steps"].append(step)
    result["seconds"] = round(time.time() - start, 1)
    again = [f"{s['step']}@{s['comfyui']}" for s in result["steps"] if s["status"] != "ok"]
    result["rerun"] = ",".join(again)
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=1))
    table = gpu_report.markdown(result)
    (out / "gpu_suite.md").write_text(table)
    print(table)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not again else 1


if __name__ == "__main__":
    sys.exit(main())
