"""Block swap: training-step peak memory and seconds per step for blocks_to_swap = 0, 8, 16 and every block,
each against N = 0 in the same run.

    $KILN_PYTHON bench/memory.py [--families sdxl,sd3,sd35l] [--counts 0,8,16,all] [--steps 4] [--warmup 2]
                                 [--rank 16] [--checkpointing on|off] [--json out.json]

trainer_core.training.loop.train on random-weight networks (bench/train_overhead.py builds them), block swap applied as the
Train nodes apply it, gradient checkpointing on unless told otherwise. On a CUDA GPU: real shapes (SDXL base
UNet, SD3-medium and SD3.5-Large MMDiTs) in bf16 at 1024², batch 1; the peak is torch.cuda.max_memory_allocated
from the end of the first step on (the steady state: the swapped blocks' device storage is freed when the swap
starts, after the network was built on the device). Targets (bench/README.md): SD3.5-Large-shaped LoRA at 1024²
under 12 GB with every block swapped; s/step within 1.5x of N = 0 where N = 0 fits. On the CPU the same code runs
on the fixtures' shapes at 64² (CPU→CPU copies): the s/step ratio is the cost of the hooks and copies, and the
peak (RSS) does not fall, since host and device are the same memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_overhead import kiln_step, peak_memory_mib, peak_memory_reset, prepare, setup_comfy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=None, help="comma list of sd1, sdxl, sd3, sd35l (default: sdxl,sd3,sd35l "
                    "on a GPU, sd1,sdxl,sd3 on the CPU)")
    ap.add_argument("--counts", default="0,8,16,all")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    setup_comfy(cpu=not gpu)
    families = (args.families or ("sdxl,sd3,sd35l" if gpu else "sd1,sdxl,sd3")).split(",")
    rows = []
    for family in families:
        b = prepare(family)
        total = len(b.blocks)
        counts = list(dict.fromkeys(min(total, total if c == "all" else int(c)) for c in args.counts.split(",")))
        base = None
        for n in counts:
            started = []

            def clock():  # the peak from the end of the first step on: the steady state of a run
                if not started:
                    peak_memory_reset(b.device)
                    started.append(True)
                return time.perf_counter()
            try:
                sec, _ = kiln_step(b, args.rank, args.steps, args.warmup, args.checkpointing == "on", clock, swap=n)
                peak = peak_memory_mib(b.device)
            except torch.OutOfMemoryError:
                sec, peak = float("nan"), float("inf")
                torch.cuda.empty_cache()
            base = base if base is not None else sec
            row = dict(family=family, shape="real" if b.real else "fixture", params_m=round(b.params_m, 1),
                       resolution=b.x0.shape[-1] * 8, blocks=total, blocks_to_swap=n, s_step=sec,
                       ratio=sec / base, peak_mib=peak, checkpointing=args.checkpointing == "on",
                       device=torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}")
            rows.append(row)
            print(f"{family:5} {row['shape']:7} {b.params_m:7.1f}M {row['resolution']}px swap {n:3}/{total:<3} "
                  f"{sec:8.3f} s/step  ×{sec / base:5.2f} vs 0  peak {peak:9.0f} MiB", flush=True)
        del b
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
