"""Step time of every optimizer Kiln offers, relative to AdamW, measured in one run on the same network.

    $KILN_PYTHON bench/optimizers.py [--family sd1] [--steps 8] [--warmup 3] [--rank 32] [--clock wall|cpu]
                                     [--json out.json]

Each row is trainer_core.training.loop.train's whole optimizer step (bench/train_overhead.kiln_step) with that optimizer
(kohya name, defaults), plus AdamW with fused_backward_pass; on a GPU the real SDXL/SD3 shapes in bf16, on the
CPU the test fixtures' shapes in fp32 at 64², where the ratio to AdamW, not the time, is the figure. The
network is built once and every optimizer runs on it in turn, AdamW measured first and again last (the
drift between the two says how steady the machine was).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import kiln_step, prepare, setup_comfy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default=None, help="sd1, sdxl or sd3 (default: sdxl on GPU, sd1 on CPU)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (steadier on a shared machine; run with OMP_NUM_THREADS=1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    setup_comfy(cpu=not gpu)
    from trainer_core.errors import KilnError
    from trainer_core.maths.optim import OPTIMIZERS

    b = prepare(args.family or ("sdxl" if gpu else "sd1"))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runs = [("AdamW", {})] + [(o, {}) for o in OPTIMIZERS if o != "AdamW"]
    runs += [("AdamW+fused_backward_pass", {"fused_backward_pass": True, "max_grad_norm": 0.0}), ("AdamW (again)", {})]
    rows, base = [], None
    for label, extra in runs:
        name = label.split("+")[0].split(" ")[0]
        try:
            seconds, _ = kiln_step(b, args.rank, args.steps, args.warmup, clock=clock, optimizer_type=name, **extra)
        except KilnError as e:
            print(f"{label:26} skipped: {e}", flush=True)
            continue
        base = base or seconds
        rows.append(dict(optimizer=label, seconds=seconds, relative_to_adamw=seconds / base, family=b.family,
                         device=torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}"))
        print(f"{label:26} {seconds * 1000:8.1f} ms/step ({args.clock})  {seconds / base:5.2f}× AdamW", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
