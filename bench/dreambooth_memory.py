"""DreamBooth (full fine-tuning) memory: peak host RSS of Kiln's training step per optimizer, with and without
fused_backward_pass, against the same shapes run without training (forward only), each in its own process.

    $KILN_PYTHON bench/dreambooth_memory.py [--steps 3] [--resolution 64] [--json out.json]

Every row is a fresh process that builds the test fixture's SD1 UNet (fp32, random weights; 44M parameters,
W = its weight bytes) and then does one thing: forward passes under no_grad (the floor: what sampling the same
shapes costs), or trainer_core.training.loop.train over trainer_core.training.full.FullNetwork (every UNet weight trains, as the
Train DreamBooth node runs it) for a few steps. The figure is the peak RSS above the process's RSS once the
UNet is built, in MiB and in multiples of W: fp32 AdamW needs about W (trainable copy) + W (gradients) + 2W
(moments); fused_backward_pass drops the gradients to one tensor at a time; SGD without momentum, Adafactor
and 8-bit AdamW shrink the optimizer state.

Two more rows measure how the trained weights come back into ComfyUI (the node's output MODEL), on the
fixture checkpoint loaded by ComfyUI's own loader: "set" weight patches on a clone of the input MODEL (what the
node does), or a second model object holding its own weights; each loads the output MODEL for sampling,
where ComfyUI writes the patches into the shared weights and keeps the originals as its backup.
On a CUDA GPU the same rows report torch.cuda.max_memory_allocated for the training rows as well.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from train_overhead import build, setup_comfy  # noqa: E402

ROWS = [  # label, optimizer, optimizer_args, fused
    ("forward only (no training)", None, None, False),
    ("AdamW", "AdamW", None, False),
    ("AdamW + fused_backward_pass", "AdamW", None, True),
    ("SGD (momentum 0)", "SGD", {"momentum": 0.0, "weight_decay": 0.0}, False),
    ("SGD (momentum 0) + fused_backward_pass", "SGD", {"momentum": 0.0, "weight_decay": 0.0}, True),
    ("Adafactor", "Adafactor", None, False),
    ("Adafactor + fused_backward_pass", "Adafactor", None, True),
    ("AdamW8bit", "AdamW8bit", None, False),
    ("AdamW8bit + fused_backward_pass", "AdamW8bit", None, True),
]
OUTPUT_ROWS = ["output MODEL as set patches (Kiln)", "output MODEL with its own weights"]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_training_row(index: int, steps: int, res: int) -> dict:
    gpu = torch.cuda.is_available()
    setup_comfy(cpu=not gpu)
    from trainer_core.data.cache import CachedSample, LatentCache
    from trainer_core.data.transforms import plan_geometry
    from trainer_core.families import sd1
    from trainer_core.training.full import FullNetwork
    from trainer_core.training.loop import TrainConfig, train

    label, optimizer, args, fused = ROWS[index]
    device = torch.device("cuda" if gpu else "cpu")
    net, cond, channels = build("sd1", False, device, torch.float32)
    weight_mib = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    latent = res // 8
    samples = [CachedSample(torch.randn(channels, latent, latent, generator=torch.Generator().manual_seed(i)), None,
                            "c", 1, False, plan_geometry((res, res), (res, res)), f"{i}.png") for i in range(2)]
    context = cond["context"].to(device)
    forward = lambda x, t, c: net(x, t, context=c["context"])  # noqa: E731
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = rss_mib()
    if optimizer is None:
        with torch.no_grad():
            for _ in range(steps + 2):  # the probe before and after, as a training run measures it
                x = torch.randn(1, channels, latent, latent, device=device)
                forward(x, torch.tensor([500], device=device), {"context": context})
    else:
        full = FullNetwork()
        full.add(net, "unet", "diffusion_model.")
        cfg = TrainConfig(steps=steps, learning_rate=1e-5, optimizer=optimizer, optimizer_args=args,
                          max_grad_norm=0.0, fused_backward_pass=fused, batch_size=1)
        try:
            train(full, sd1.SD1Objective(torch.linspace(0.9999, 0.005, 1000)), forward,
                  lambda caps, train=False, geometries=None: {"context": context.expand(len(caps), -1, -1)},
                  LatentCache(samples, None, "x"), lambda z: z, cfg, device)
        finally:
            full.restore()
    peak = peak_rss_mib() - start
    out = {"row": label, "weights_mib": round(weight_mib, 1), "peak_rss_above_model_mib": round(peak, 1),
           "peak_rss_in_W": round(peak / weight_mib, 2)}
    if gpu:
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def one_output_row(index: int, checkpoint: str) -> dict:
    """Load the fixture checkpoint, make "trained" weights (each UNet weight + 1e-3, as the node hands them over),
    build the output MODEL one way, and load it for sampling."""
    setup_comfy(cpu=not torch.cuda.is_available())
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)[0]
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model
    weight_mib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    start = rss_mib()
    trained = {f"diffusion_model.{k}": (p.detach() + 1e-3).cpu() for k, p in unet.named_parameters()}
    if index == 0:
        out = model.clone()
        out.add_patches({k: ("set", (t,)) for k, t in trained.items()}, 1.0)
    else:
        params = dict(model.model.named_parameters())
        memo = {id(params[k]): torch.nn.Parameter(t, requires_grad=False) for k, t in trained.items()}
        own = copy.deepcopy(model.model, memo)
        out = comfy.model_patcher.ModelPatcher(own, model.load_device, model.offload_device)
    del trained
    comfy.model_management.load_models_gpu([out], force_full_load=True)  # what sampling the output MODEL does
    comfy.model_management.load_models_gpu([model], force_full_load=True)  # and the input MODEL again
    peak = peak_rss_mib() - start
    return {"row": OUTPUT_ROWS[index], "weights_mib": round(weight_mib, 1), "peak_rss_above_model_mib": round(peak, 1),
            "peak_rss_in_W": round(peak / weight_mib, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--checkpoint", default=None, help="the tiny SD1 fixture (default: $KILN_FIXTURE_CACHE's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output-row", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row is not None:
        print(json.dumps(one_training_row(args.row, args.steps, args.resolution)))
        return
    if args.output_row is not None:
        print(json.dumps(one_output_row(args.output_row, args.checkpoint)))
        return
    results = []
    for i in range(len(ROWS)):
        results.append(run_child(["--row", str(i), "--steps", str(args.steps), "--resolution", str(args.resolution)],
                                 ROWS[i][0]))
    ckpt = args.checkpoint or str(Path(os.environ.get("KILN_FIXTURE_CACHE", REPO / ".kiln" / "fixtures"))
                                  / "kiln-tiny-sd1-v1-s0.safetensors")
    if os.path.isfile(ckpt):
        for i in range(len(OUTPUT_ROWS)):
            results.append(run_child(["--output-row", str(i), "--checkpoint", ckpt], OUTPUT_ROWS[i]))
    else:
        print(f"(no {ckpt}: run the tests once to build it; output-MODEL rows skipped)")
    base = results[0].get("peak_rss_above_model_mib")
    print(f"\nSD1 fixture UNet, W = {results[0].get('weights_mib')} MiB of fp32 weights; peak RSS above the built model")
    print(f"{'row':<42} {'MiB':>9} {'× W':>6} {'vs forward':>11}" + ("  cuda MiB" if "cuda_peak_mib" in results[1] else ""))
    for r in results:
        if "error" in r:
            print(f"{r['row']:<42} {'n/a':>9}   {r['error']}")
            continue
        ratio = f"{r['peak_rss_above_model_mib'] / base:>10.1f}x" if base and r["row"] not in OUTPUT_ROWS else f"{'':>11}"
        cuda = f"  {r['cuda_peak_mib']:>8}" if "cuda_peak_mib" in r else ""
        print(f"{r['row']:<42} {r['peak_rss_above_model_mib']:>9.1f} {r['peak_rss_in_W']:>6.2f} {ratio}{cuda}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def run_child(extra: list[str], label: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, cwd=REPO)
    line = next((line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"row": label, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    return json.loads(line)


if __name__ == "__main__":
    main()
