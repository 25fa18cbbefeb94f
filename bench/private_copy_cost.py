"""What training under ComfyUI's dynamic VRAM costs Kiln: the non-dynamic copy it trains through.

    KILN_COMFYUI=/path/to/ComfyUI-0.33 $KILN_PYTHON bench/private_copy_cost.py [--steps 5] [--json out.json]
                                                                    [--device cpu|cuda] [--shape tiny|real]

Under dynamic VRAM (ComfyUI >= 0.16, NVIDIA) Kiln trains through ComfyUI's non-dynamic delegate of the MODEL: the
checkpoint re-loaded by ComfyUI's own loader (nodes/comfy/compat.py). Dynamic VRAM itself exists on CUDA only, but
the re-load is the same call on any device, so this measures it on the tiny SD1 fixture (CPU): the seconds to get
the copy, the host RAM it adds against the model's weight bytes, and the forward+backward step time through the
copy against the same step on the loaded weights in place (ratio ~1: the copy is an ordinary model). Needs a
ComfyUI that records its loaders (cached_patcher_init, >= 0.16); older ones print why and exit. On a GPU
(--device cuda, bf16 autocast, synchronized timing) and with --shape real (SD1.5's shapes, bench/real_sd1.py at
512²) it measures what a user's model costs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import comfy_in_process  # noqa: E402


def step_seconds(comfy, target, steps: int, latent: int) -> float:
    sd1 = comfy.pack_module("trainer_core.families.sd1")
    network = comfy.pack_module("trainer_core.lora.network")
    cmodel = comfy.pack_module("nodes.comfy.model")
    net = network.LoRANetwork(target.network, sd1.unet_rules(8, 8, 0, 0), sd1.unet_namer(target.network), seed=0)
    g = torch.Generator().manual_seed(0)
    device = cmodel.device_of(target.patcher)
    x, t = torch.randn(2, 4, latent, latent, generator=g).to(device), torch.tensor([100.0, 700.0], device=device)
    context = torch.randn(2, 77, 768, generator=g).to(device)
    forward = cmodel.unet_forward(target.patcher, target.network)
    cuda = device.type == "cuda"
    times = []
    with net.attached(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            forward(x, t, {"context": context}).float().square().mean().backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shape", choices=("tiny", "real"), default="tiny",
                    help="tiny: the SD1 test fixture at 64²; real: SD1.5's shapes (bench/real_sd1.py) at 512²")
    opts = ap.parse_args()
    comfy, _ = comfy_in_process(Path(tempfile.mkdtemp(prefix="kiln-bench-")), cpu=opts.device == "cpu")
    from fixtures import tiny_models
    cache = Path(os.environ.get("KILN_FIXTURE_CACHE") or Path(__file__).resolve().parents[1] / ".kiln" / "fixtures")
    cache.mkdir(parents=True, exist_ok=True)  # the tests' and compare_native's cache: each file is built once
    if opts.shape == "real":
        from real_sd1 import build_real_sd1_checkpoint, real_sd1_name
        ckpt = Path(build_real_sd1_checkpoint(str(cache / real_sd1_name())))
    else:
        ckpt = Path(tiny_models.build_sd1_checkpoint(str(cache / tiny_models.default_name("sd1"))))
    latent = 64 if opts.shape == "real" else 8
    model = comfy.run_node("CheckpointLoaderSimple", ckpt_name=comfy.install_checkpoint(ckpt))[0]
    if getattr(model, "cached_patcher_init", None) is None:
        sys.exit("this ComfyUI records no loader for a MODEL (< 0.16): it has no dynamic VRAM and nothing to re-load")
    cmodel = comfy.pack_module("nodes.comfy.model")
    compat = comfy.pack_module("nodes.comfy.compat")
    with torch.inference_mode():
        with cmodel.training_session(model, "bench") as target:
            in_place = step_seconds(comfy, target, opts.steps, latent)
        copy = compat.private_copy(model)  # what the session does first; measured on its own here
        del copy
        with cmodel.training_session(model, "bench", private=True) as target:
            through_copy = step_seconds(comfy, target, opts.steps, latent)
            note = target.note
    first = compat.private_copy(model)
    result = {
        "model_weight_bytes": first.size_bytes, "copy_seconds": round(first.seconds, 3),
        "copy_host_bytes": first.host_bytes, "host_bytes_per_weight_byte": round(first.host_bytes / first.size_bytes, 3),
        "step_s_in_place": round(in_place, 4), "step_s_through_copy": round(through_copy, 4),
        "step_ratio_copy_vs_in_place": round(through_copy / in_place, 3), "node_note": note,
        "device": str(cmodel.device_of(model)), "shape": opts.shape,
    }
    for k, v in result.items():
        print(f"{k:32} {v}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
