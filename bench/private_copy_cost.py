"""What training under ComfyUI's dynamic VRAM costs Kiln: the non-dynamic copy it trains through.

    KILN_COMFYUI=/path/to/ComfyUI-0.33 $KILN_PYTHON bench/private_copy_cost.py [--steps 5] [--json out.json]

Under dynamic VRAM (ComfyUI >= 0.16, NVIDIA) Kiln trains through ComfyUI's non-dynamic delegate of the MODEL: the
checkpoint re-loaded by ComfyUI's own loader (nodes/comfy/compat.py). Dynamic VRAM itself exists on CUDA only, but
the re-load is the same call on any device, so this measures it on the tiny SD1 fixture (CPU): the seconds to get
the copy, the host RAM it adds against the model's weight bytes, and the forward+backward step time through the
copy against the same step on the loaded weights in place (ratio ~1: the copy is an ordinary model). Needs a
ComfyUI that records its loaders (cached_patcher_init, >= 0.16); older ones print why and exit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import comfy_in_process  # noqa: E402


def step_seconds(comfy, target, steps: int) -> float:
    sd1 = comfy.pack_module("trainer_core.families.sd1")
    network = comfy.pack_module("trainer_core.lora.network")
    cmodel = comfy.pack_module("nodes.comfy.model")
    net = network.LoRANetwork(target.network, sd1.unet_rules(8, 8, 0, 0), sd1.unet_namer(target.network), seed=0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100.0, 700.0])
    context = torch.randn(2, 77, 768, generator=g)
    forward = cmodel.unet_forward(target.patcher, target.network)
    times = []
    with net.attached():
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            forward(x, t, {"context": context}).square().mean().backward()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="")
    opts = ap.parse_args()
    comfy, _ = comfy_in_process(Path(tempfile.mkdtemp(prefix="kiln-bench-")))
    from fixtures import tiny_models
    cache = Path(tempfile.gettempdir()) / "kiln-bench-fixtures"
    cache.mkdir(exist_ok=True)
    ckpt = Path(tiny_models.build_sd1_checkpoint(str(cache / tiny_models.default_name("sd1"))))
    model = comfy.run_node("CheckpointLoaderSimple", ckpt_name=comfy.install_checkpoint(ckpt))[0]
    if getattr(model, "cached_patcher_init", None) is None:
        sys.exit("this ComfyUI records no loader for a MODEL (< 0.16): it has no dynamic VRAM and nothing to re-load")
    cmodel = comfy.pack_module("nodes.comfy.model")
    compat = comfy.pack_module("nodes.comfy.compat")
    with torch.inference_mode():
        with cmodel.training_session(model, "bench") as target:
            in_place = step_seconds(comfy, target, opts.steps)
        copy = compat.private_copy(model)  # what the session does first; measured on its own here
        del copy
        with cmodel.training_session(model, "bench", private=True) as target:
            through_copy = step_seconds(comfy, target, opts.steps)
            note = target.note
    first = compat.private_copy(model)
    result = {
        "model_weight_bytes": first.size_bytes, "copy_seconds": round(first.seconds, 3),
        "copy_host_bytes": first.host_bytes, "host_bytes_per_weight_byte": round(first.host_bytes / first.size_bytes, 3),
        "step_s_in_place": round(in_place, 4), "step_s_through_copy": round(through_copy, 4),
        "step_ratio_copy_vs_in_place": round(through_copy / in_place, 3), "node_note": note,
    }
    for k, v in result.items():
        print(f"{k:32} {v}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
