"""Cancel latency: from ComfyUI's interrupt (what the Cancel button / POST /interrupt does) to the Train node's end.

    $KILN_PYTHON bench/cancel_latency.py [--trials 5] [--steps-before 3] [--save-every 2] [--threads N]

In a real ComfyUI (tests/conftest.py's ComfyInProcess, CPU) with the tiny SD1 checkpoint and the test dataset,
Train LoRA (SD1) runs with save_every_n_steps; a second thread calls ``interrupt_current_processing`` at a random
moment inside step --steps-before + 1 (uniform over a measured step time), and the time until the node has raised
(model restored, adapters detached) is recorded. Printed: the mean seconds per step, each trial's latency, the
median latency and its ratio to a step (target: at most 1, "within one step"). Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_throughput import comfy_in_process  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--steps-before", type=int, default=3)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    import os
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="kiln-cancel-bench-"))
    comfy = comfy_in_process(work / "comfy", cpu=True)
    from fixtures import tiny_models
    from fixtures.datasets import make_dataset
    import comfy.model_management as mm
    import comfy.utils as cutils

    cache_dir = Path(os.environ.get("KILN_FIXTURE_CACHE") or REPO / ".kiln" / "fixtures")
    ckpt = Path(tiny_models.build_sd1_checkpoint(str(cache_dir / tiny_models.default_name("sd1"))))
    (comfy.checkpoints_dir / ckpt.name).symlink_to(ckpt)
    data = make_dataset(work / "data")
    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=ckpt.name)
    ds = comfy.run_node("KilnLoadDataset", folder=str(data["train_dir"]), caption_extension=".txt", class_tokens="",
                        repeats=1, resolution=64, batch_size=2, enable_bucket=True, min_bucket_reso=32,
                        max_bucket_reso=128, bucket_reso_steps=32, bucket_no_upscale=False)[0]
    ds = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    cfg = comfy.run_node("KilnLoraConfig", rank=4, alpha=4.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    train = dict(model=model, clip=clip, dataset=ds, lora_config=cfg, steps=10_000, learning_rate=1e-3,
                 optimizer="AdamW", lr_scheduler="constant", warmup_steps=0, grad_accum=1, max_grad_norm=1.0, seed=0,
                 precision="fp32", gradient_checkpointing=False, loss_type="l2", min_snr_gamma=0.0,
                 mask_normalize=False, prior_loss_weight=1.0, sample_prompts="", sample_every=0, sample_steps=1,
                 sample_cfg=1.0, save_every_n_steps=args.save_every)
    rng = random.Random(0)
    latencies, step_times = [], []
    for trial in range(args.trials):
        stamps: list[float] = []
        fired: list[float] = []

        def hook(value, total, preview=None, prompt_id=None, node_id=None):
            stamps.append(time.perf_counter())
            if len(stamps) == args.steps_before:  # interrupt somewhere inside the next step
                step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else 0.5
                delay = rng.uniform(0, step)
                threading.Timer(delay, lambda: (fired.append(time.perf_counter()),
                                                mm.interrupt_current_processing(True))).start()
        old = cutils.PROGRESS_BAR_HOOK
        cutils.set_progress_bar_global_hook(hook)
        try:
            comfy.run_node("KilnTrainSD1", **train, save_name=f"kiln/cancel_bench_{trial}")
            raise SystemExit("the node finished instead of being cancelled")
        except mm.InterruptProcessingException:
            end = time.perf_counter()
        finally:
            mm.interrupt_current_processing(False)
            cutils.set_progress_bar_global_hook(old)
        latencies.append(end - fired[0])
        step_times.append((stamps[args.steps_before - 1] - stamps[0]) / max(1, args.steps_before - 1))
        kept = sorted(p.name for p in (comfy.loras_dir / "kiln").glob(f"cancel_bench_{trial}-step*.safetensors"))
        print(f"trial {trial}: cancelled {latencies[-1]:.3f} s after the interrupt; step {step_times[-1]:.3f} s; "
              f"intermediates kept: {', '.join(kept) or 'none'}", flush=True)
    step = statistics.mean(step_times)
    med = statistics.median(latencies)
    print(f"mean step {step:.3f} s; cancel latency median {med:.3f} s, max {max(latencies):.3f} s; "
          f"median / step {med / step:.2f}")


if __name__ == "__main__":
    main()
