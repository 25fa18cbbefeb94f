"""Network types: the training step of each algorithm relative to LoRA at the same rank, and, for LoKr and
LoHa, the bypass forward against the materialised delta weight; all measured in one run.

    $KILN_PYTHON bench/algorithms.py [--family sd1] [--rank 8] [--steps 6] [--warmup 2] [--threads 2] [--json out.json]

Part 1 (whole step): trainer_core.training.loop.train on the test fixture's network shapes (fp32, 64², batch 1; the real
shapes in bf16 on a CUDA GPU), every algorithm with kohya's LoRA targets at the same rank and alpha (LoKr at
factor 8, so w2 stays low rank on the larger layers); seconds per optimizer step, the ratio to LoRA, trainable
parameters. Part 2 (one layer, forward + backward): LoKr's bypass (w1·X·w2ᵀ, lycoris.functional.lokr) against
building ΔW = kron(w1, w2) and applying it, and LoHa's materialised ΔW (lycoris.functional.loha) against a
bypass through the face-splitting identity (w1a·w1b) ⊙ (w2a·w2b) = (w1a • w2a)(w1b ∘ w2b) of rank r², at the
layer widths of SD1/SDXL and a token count per width. Kiln keeps the faster path per layer type (see
trainer_core/lora/lycoris_algos.py).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_overhead import kiln_step, prepare, setup_comfy, step_bench_args, sync  # noqa: E402

ALGOS = {"lora": {}, "loha": {}, "lokr": {"factor": 8}, "dora": {}}


def timed(fn, reps, device) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def layer_paths(width, tokens, rank, reps, device, dtype):
    """Seconds per forward+backward of the adapter delta alone, each path, for a width×width linear layer."""
    from lycoris.functional import factorization, loha, lokr

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, width, generator=g).to(device, dtype)
    a, b = factorization(width, 8)
    c, d = factorization(width, 8)

    def leaf(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(device, dtype).requires_grad_(True)

    w1, w2a, w2b = leaf(a, c), leaf(b, rank), leaf(rank, d)
    h1a, h1b, h2a, h2b = leaf(width, rank), leaf(rank, width), leaf(width, rank), leaf(rank, width)
    gamma = torch.tensor(1.0, device=device)

    def lokr_bypass():
        lokr.bypass_forward_diff(x, None, w1, None, None, None, w2a, w2b, None, gamma=1.0, backend="torch").sum().backward()

    def lokr_dense():
        dw = lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=1.0, backend="torch")
        torch.nn.functional.linear(x, dw).sum().backward()

    def loha_dense():
        dw = loha.diff_weight(h1b, h1a, h2b, h2a, None, None, gamma=gamma, backend="torch")
        torch.nn.functional.linear(x, dw).sum().backward()

    def loha_face_split():
        up = (h1a[:, :, None] * h2a[:, None, :]).reshape(width, rank * rank)    # row-wise Kronecker (out, r²)
        down = (h1b[:, None, :] * h2b[None, :, :]).reshape(rank * rank, width)  # column-wise (r², in)
        torch.nn.functional.linear(torch.nn.functional.linear(x, down), up).sum().backward()

    return {name: timed(fn, reps, device) for name, fn in
            [("lokr_bypass", lokr_bypass), ("lokr_dense", lokr_dense), ("loha_dense", loha_dense),
             ("loha_face_split", loha_face_split)]}


def main() -> None:
    args = step_bench_args(__doc__)
    gpu = torch.cuda.is_available()
    setup_comfy(cpu=not gpu)
    b = prepare(args.family)
    device, dtype = b.device, b.dtype
    out = {"family": args.family, "rank": args.rank, "device": str(device), "steps": {}, "layers": {}}
    print(f"{args.family} ({'real shapes, bf16' if gpu else 'fixture shapes, fp32'}), rank {args.rank}: s/step")
    for algorithm, kw in ALGOS.items():
        sec, network = kiln_step(b, args.rank, args.steps, args.warmup, network_options={"algorithm": algorithm, **kw})
        params, modules = sum(p.numel() for p in network.parameters()), len(network)
        out["steps"][algorithm] = {"seconds_per_step": sec, "params": params, "modules": modules}
        ratio = sec / out["steps"]["lora"]["seconds_per_step"]
        print(f"  {algorithm:5} {sec:8.4f}  ×{ratio:5.2f} vs lora  {params / 1e6:6.2f}M params in {modules} modules",
              flush=True)
    print("one linear layer, forward+backward of the delta alone: ms (dense / bypass)")
    for width, tokens in ((320, 4096), (640, 1024), (1280, 256), (1280, 4096)):
        r = layer_paths(width, tokens, args.rank, 5, device, dtype)
        out["layers"][f"{width}x{tokens}"] = r
        print(f"  {width:5} wide, {tokens:5} tokens: lokr bypass {r['lokr_bypass'] * 1e3:7.2f}  dense "
              f"{r['lokr_dense'] * 1e3:7.2f} (×{r['lokr_dense'] / r['lokr_bypass']:.2f});  loha dense "
              f"{r['loha_dense'] * 1e3:7.2f}  face-split {r['loha_face_split'] * 1e3:7.2f} "
              f"(×{r['loha_dense'] / r['loha_face_split']:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
