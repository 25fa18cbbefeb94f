"""What EMA and differential output preservation cost per training step, relative to plain LoRA training in the
same run.

    $KILN_PYTHON bench/better_loras.py [--family sd1] [--rank 8] [--steps 6] [--warmup 2] [--threads 2] [--json out.json]

trainer_core.training.loop.train on the test fixture's network shapes (fp32, 64², batch 1; the real shapes in bf16 at
1024² on a CUDA GPU), kohya's LoRA targets: plain; ema_decay 0.999 with the average on the training device and
in host memory; diff_output_preservation (every caption holds the trigger, so every sample adds one forward
without adapters and one forward + backward with them).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_overhead import kiln_step, prepare, setup_comfy, step_bench_args  # noqa: E402

VARIANTS = {
    "plain": {},
    "ema": {"ema_decay": 0.999},
    "ema_on_host": {"ema_decay": 0.999, "ema_on_host": True},
    "preservation": {"diff_output_preservation": True, "preservation_pairs": [("a", "b")]},
}


def main() -> None:
    args = step_bench_args(__doc__)
    gpu = torch.cuda.is_available()
    setup_comfy(cpu=not gpu)
    b = prepare(args.family)
    out = {"family": args.family, "rank": args.rank, "device": str(b.device), "steps": {}}
    print(f"{args.family} ({'real shapes, bf16' if gpu else 'fixture shapes, fp32'}), rank {args.rank}: s/step")
    for name, options in VARIANTS.items():
        sec, _ = kiln_step(b, args.rank, args.steps, args.warmup, **options)
        out["steps"][name] = sec
        print(f"  {name:13} {sec:8.4f}  ×{sec / out['steps']['plain']:5.2f} vs plain", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
