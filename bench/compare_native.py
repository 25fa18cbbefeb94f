"""Kiln's KilnTrainSD1 versus ComfyUI's native TrainLoraNode: seconds per step and resident memory.

    $KILN_PYTHON bench/compare_native.py [--steps 20] [--warmup 3] [--rank 8] [--batch 2] [--resolution 64]
                                         [--json out.json] [--mode subprocess|single] [--threads N]
                                         [--kiln-conv-rank N] [--retries N]
                                         [--device cpu|cuda] [--precision fp32|bf16] [--shape tiny|real]

Both trainers run inside a real ComfyUI (KILN_COMFYUI from .kiln/env), forced to the CPU unless --device cuda,
with this pack loaded by ComfyUI's own custom-node loader (tests/conftest.py's ComfyInProcess), on the tiny
random-weight SD1 checkpoint of tests/fixtures/tiny_models.py (or, with --shape real, one of SD1.5's shapes from
bench/real_sd1.py) and the generated dataset of tests/fixtures/datasets.py. On CUDA the steps are synchronized
before each timestamp, and peak VRAM (torch.cuda.max_memory_allocated) is reported beside RSS.

What is held equal
  * the checkpoint, loaded once per process by CheckpointLoaderSimple;
  * the latents: Kiln's Cache Latents output (buckets off, so every image is resolution²) is what Kiln trains
    on, and the very same tensors, stacked, are native's LATENT input;
  * the conditioning: the same CLIP encodes the same captions (native gets CLIPTextEncode's output, one
    entry per image; Kiln encodes inside its node with the same CLIP; the bench checks the two agree);
  * steps, rank, batch size, AdamW (lr, betas and weight decay 0.01 are the same), the compute precision (fp32, or
    bf16 autocast: Kiln's precision, native's training_dtype) and fp32
    LoRA weights, gradient checkpointing off, one gradient-accumulation step, LoRA scale alpha/rank = 1/rank
    (native always uses alpha 1; Kiln is given alpha 1). Kiln's gradient clipping is turned off
    (native has none), its sample previews are minimal (sample_every 0, sample_steps 1: one 1-step preview
    after the loop, outside the timed steps).
What is not (and cannot be) equal: what each trains. Native puts a LoRA on every weight with 2+ dims (all
convolutions, time embedding, in/out convs) and trains a full-size difference for every 1-D weight (norms)
and every bias; Kiln follows kohya (LoRA on Linear / 1x1 conv in the transformer blocks; --kiln-conv-rank
adds the ResNet convolutions). Trainable parameter counts are printed for both.

Timing: ComfyUI's progress-bar hook is called by both nodes right after each optimizer step (Kiln:
Progress.update, native: ui_pbar.update). The bench stamps every call with time.perf_counter() and reports
(t[warmup + steps] - t[warmup]) / steps, i.e. the mean of the last `steps` optimizer steps after `warmup`
steps, excluding model loading, VAE and text encoding, Kiln's probe loss and previews, and native's adapter
set-up. The median step is reported too; Kiln's own 'kiln_seconds_per_step' metadata (which averages every
step, warm-up included) is printed as a cross-check.

Memory: a background thread samples VmRSS from /proc/self/status every ~5 ms while the node runs; the kernel's
high-water mark (VmHWM, reset through /proc/self/clear_refs just before the node) is read as well, so a
spike between samples cannot hide. "Baseline" is RSS after the model was loaded and placed
(load_models_gpu), the latents cached and captions encoded, right before the trainer node runs.

Contention: this is wall-clock timing, so other processes on the machine distort it (badly with several
torch threads: OpenMP threads that lose their core stall the rest). Each run reports how many cores' worth of
CPU other processes used during its timed steps (/proc/stat minus this process), its CPU seconds per step,
and the median step; a disturbed run is repeated (--retries) and flagged in the output. On a shared machine,
--threads 1 gives steadier ratios.

What autograd saves for backward is metered during the warm-up steps by an identity saved_tensors_hooks pair
that stays installed for the whole node (about 1 us per saved tensor in the timed steps, well under 1% here):
it shows whether a trainer keeps copies of the model's weights (native materializes patched weights) or
only aliases of them (Kiln).

Isolation (--mode): by default each trainer runs in a fresh subprocess (Kiln first, then native; they are
never concurrent), each building the same inputs deterministically; the parent checks that both saw
bit-identical latents and reports them side by side. This is the honest choice for memory: in one process
the second run inherits whatever the first left in the allocator and the page cache, and the
kernel's VmHWM cannot be compared between runs. `--mode single` runs both in ONE process on the very same
tensor objects (Kiln first, native second, baseline re-measured before each), for a same-process timing
check; its RSS figures for the second run are less trustworthy.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# --- memory ----------------------------------------------------------------------------------------

_STATUS = "/proc/self/status"


def _status_kb(field: str) -> int:
    with open(_STATUS) as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (user+nice+system+irq+softirq+steal), /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS every `interval` seconds in a daemon thread; `samples` holds (perf_counter, bytes)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_bytes()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), rss_bytes()))

    def peak(self, start: float = float("-inf"), end: float = float("inf")) -> int:
        vals = [b for t, b in self.samples if start <= t <= end]
        return max(vals) if vals else 0


def settled_rss() -> int:
    gc.collect()
    time.sleep(0.05)
    return min(rss_bytes() for _ in range(5))


# --- ComfyUI in process ----------------------------------------------------------------------------

def comfy_in_process(root: Path, cpu: bool = True):
    """tests/conftest.py's ComfyInProcess (pytest is only imported, never run), on the CPU unless not ``cpu``."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import conftest  # noqa: E402  (puts tests/ on sys.path for `fixtures` too)

    env = conftest.read_kiln_env()
    comfyui = env.get("KILN_COMFYUI")
    if not comfyui or not (Path(comfyui) / "main.py").is_file():
        sys.exit("ComfyUI is not provisioned (KILN_COMFYUI unset or has no main.py): run 'bash scripts/provision.sh'")
    conftest.FORCE_CPU = cpu
    return conftest.ComfyInProcess(root, Path(comfyui)), conftest


class SavedTensorMeter:
    """What autograd saves for backward during the warm-up steps (an identity saved_tensors_hooks pair, so the
    timed steps pay only an early return). Storages are deduplicated per step and sorted into: aliases of the
    model's own parameters/buffers (no copy), new tensors shaped like a model parameter (a materialized weight,
    i.e. a copy of that weight), and everything else (activations)."""

    def __init__(self, clock: "StepClock", network, warmup: int):
        self.clock, self.warmup = clock, warmup
        tensors = list(network.parameters()) + list(network.buffers())
        self.model_storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.param_shapes = {tuple(t.shape) for t in tensors}
        self.per_step: dict[int, dict] = {}

    def pack(self, t):
        step = len(self.clock.stamps) + 1
        if step > self.warmup:
            return t
        rec = self.per_step.setdefault(step, {"seen": set(), "model_alias": 0, "weight_copies": 0, "activations": 0,
                                              "saved_tensors": 0})
        rec["saved_tensors"] += 1
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in rec["seen"]:
            return t
        rec["seen"].add(ptr)
        kind = ("model_alias" if ptr in self.model_storages
                else "weight_copies" if tuple(t.shape) in self.param_shapes and t.dim() >= 1 and t.numel() > 1
                else "activations")
        rec[kind] += storage.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t

    def installed(self):
        import torch
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def summary(self) -> dict:
        """The largest warm-up step (step 1 may differ, e.g. lazily built state)."""
        steps = {k: {kk: v for kk, v in r.items() if kk != "seen"} for k, r in self.per_step.items()}
        if not steps:
            return {"model_alias": None, "weight_copies": None, "activations": None}
        return max(steps.values(), key=lambda r: r["weight_copies"] + r["activations"])


class StepClock:
    """Stamps ComfyUI progress-bar updates of a bar with `total` steps (both nodes update after opt.step)."""

    def __init__(self, total: int, warmup: int = 0, cuda: bool = False):
        self.total, self.warmup, self.cuda = total, warmup, cuda
        self.vram: dict[str, int] = {}  # CUDA: peak allocated before the timed steps, and during them
        self.stamps: dict[int, float] = {}
        self.cpu: dict[int, float] = {}  # process CPU seconds (all threads) at the same moments
        self.sys: dict[int, float] = {}  # of which in the kernel (page faults, madvise/munmap, ...)
        self.busy: dict[int, float] = {}  # whole machine's busy CPU seconds, to see other processes' load

    @contextlib.contextmanager
    def installed(self, comfy):
        import comfy.utils as cu
        import torch
        previous = cu.PROGRESS_BAR_HOOK

        def hook(value, total, preview=None, prompt_id=None, node_id=None):
            if total == self.total and value not in self.stamps:
                if self.cuda:  # a stamp marks a finished step, not a queued one
                    torch.cuda.synchronize()
                    if value == self.warmup:
                        self.vram["before_steps"] = torch.cuda.max_memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    elif value == self.total:
                        self.vram["steps"] = torch.cuda.max_memory_allocated()
                self.stamps[value] = time.perf_counter()
                self.cpu[value] = time.process_time()
                self.sys[value] = os.times().system
                self.busy[value] = machine_busy_seconds()
            if previous is not None:
                previous(value, total, preview, node_id=node_id)

        cu.set_progress_bar_global_hook(hook)
        try:
            yield self
        finally:
            cu.set_progress_bar_global_hook(previous)

    def per_step(self, warmup: int, steps: int) -> dict:
        end = warmup + steps
        if any(i not in self.stamps for i in range(max(1, warmup), end + 1)):
            raise RuntimeError(f"progress hook saw steps {sorted(self.stamps)[:5]}..., expected 1..{end}")
        deltas = [self.stamps[i] - self.stamps[i - 1] for i in range(max(2, warmup + 1), end + 1)]
        cpu_deltas = [self.cpu[i] - self.cpu[i - 1] for i in range(max(2, warmup + 1), end + 1)]
        sys_deltas = [self.sys[i] - self.sys[i - 1] for i in range(max(2, warmup + 1), end + 1)]
        return {"seconds_per_step": (self.stamps[end] - self.stamps[warmup]) / steps,
                "cpu_seconds_per_step": (self.cpu[end] - self.cpu[warmup]) / steps,
                "median_step": statistics.median(deltas) if deltas else None,
                "step_seconds": deltas, "step_cpu_seconds": cpu_deltas, "step_sys_seconds": sys_deltas,
                "sys_seconds_per_step": (self.sys[end] - self.sys[warmup]) / steps,
                # cores' worth of CPU other processes used during the timed steps (0 on a quiet machine)
                "other_load_cores": max(0.0, (self.busy[end] - self.busy[warmup]) - (self.cpu[end] - self.cpu[warmup]))
                / max(1e-9, self.stamps[end] - self.stamps[warmup]), "window": (self.stamps[warmup], self.stamps[end])}


def run_node_with_lists(comfy, class_type: str, lists: dict, **inputs):
    """Like ComfyInProcess.run_node, but the inputs in `lists` arrive as ComfyUI's executor delivers an input
    linked to a list output (OUTPUT_IS_LIST, e.g. native's dataset nodes): as that whole list, not wrapped
    in a one-element list. Needed for TrainLoraNode (is_input_list=True), whose 0.3.75 execute() only
    defines `multi_res` when `latents` has more than one entry (one batched LATENT raises UnboundLocalError).
    """
    import asyncio
    import torch
    ex = comfy.execution
    cls = comfy.node_class(class_type)
    unique_id = f"bench-{class_type}"

    async def run():
        input_data, _missing, hidden = ex.get_input_data(inputs, cls, unique_id)
        input_data.update(lists)
        # positional: the keyword was hidden_inputs= in 0.3.x and is v3_data= in 0.33; the position is the same
        output, _ui, _expanded, pending = await ex.get_output_data("kiln-bench", unique_id, cls(), input_data,
                                                                   None, None, hidden)
        if pending:
            results = await ex.resolve_map_node_over_list_results(output)
            output, _ui, _expanded = ex.get_output_from_returns(results, cls())
        return output

    with torch.inference_mode():
        output = asyncio.run(run())
    return tuple(values[0] for values in output)


def native_defaults(cls, given: dict) -> dict:
    """Every input of a native node that ``given`` leaves out, at its declared default: newer ComfyUIs add inputs
    (0.33's TrainLoraNode: bypass_mode, offloading, ...) that its execute() needs."""
    declared = cls.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    return {name: spec[1]["default"] for name, spec in specs.items()
            if name not in given and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tensor_hash(t) -> str:
    import torch
    with torch.inference_mode(False):
        return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def param_bytes(module) -> int:
    seen, n = set(), 0
    for p in list(module.parameters()) + list(module.buffers()):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


# --- one process: set-up shared by both trainers -----------------------------------------------------

def prepare(args, workdir: Path) -> dict:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy, conftest = comfy_in_process(workdir / "comfy", cpu=args.device == "cpu")
    from fixtures import tiny_models
    from fixtures.datasets import make_dataset

    cache_dir = Path(os.environ.get("KILN_FIXTURE_CACHE") or REPO / ".kiln" / "fixtures")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.shape == "real":
        from real_sd1 import build_real_sd1_checkpoint, real_sd1_name
        ckpt = Path(build_real_sd1_checkpoint(str(cache_dir / real_sd1_name())))
    else:
        ckpt = Path(tiny_models.build_sd1_checkpoint(str(cache_dir / tiny_models.default_name("sd1"))))
    link = comfy.checkpoints_dir / ckpt.name
    if not link.exists():
        link.symlink_to(ckpt)
    data = make_dataset(workdir / "dataset", seed=args.seed)

    rss_start = settled_rss()
    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=ckpt.name)
    res = args.resolution
    ds = comfy.run_node("KilnLoadDataset", folder=str(data["train_dir"]), caption_extension=".txt", class_tokens="",
                        repeats=1, resolution=res, batch_size=args.batch, enable_bucket=False, min_bucket_reso=res,
                        max_bucket_reso=res, bucket_reso_steps=64, bucket_no_upscale=False)[0]
    cached = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    samples = cached.cache.samples
    shapes = {tuple(s.latent.shape) for s in samples}
    if len(shapes) != 1:
        raise RuntimeError(f"expected one latent shape with buckets off, got {shapes}")
    with torch.inference_mode():
        latents = torch.stack([s.latent for s in samples])
    captions = [s.caption for s in samples]

    # native's positive: CLIPTextEncode per caption, concatenated (one entry per latent)
    positive, cond_diff = [], 0.0
    for text in captions:
        c = comfy.run_node("CLIPTextEncode", clip=clip, text=text)[0]
        positive += c
        with torch.inference_mode():  # what Kiln's TextConditioning computes for the same caption
            kc, _ = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        cond_diff = max(cond_diff, float((c[0][0][:, :77].float() - kc[:, :77].float()).abs().max()))

    import comfy.model_management as mm
    with torch.inference_mode():
        mm.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model
    info = {
        "device": str(model.load_device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "shape": args.shape,
        "unet_dtype": str(next(unet.parameters()).dtype), "family": type(model.model.model_config).__name__,
        "unet_param_bytes": param_bytes(unet),
        "clip_param_bytes": param_bytes(clip.cond_stage_model),
        "vae_param_bytes": param_bytes(vae.first_stage_model),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "latent_shape": list(latents.shape), "latents_sha": tensor_hash(latents),
        "positive_sha": tensor_hash(torch.cat([c[0] for c in positive])),
        "captions": len(captions), "cond_max_abs_diff_native_vs_kiln_encode": cond_diff,
        "rss_before_model": rss_start,
    }
    return dict(comfy=comfy, model=model, clip=clip, vae=vae, cached=cached, latents=latents, positive=positive,
                info=info)


def run_trainer(which: str, ctx: dict, args) -> dict:
    import torch
    comfy, total = ctx["comfy"], args.warmup + args.steps
    common = dict(steps=total, learning_rate=args.lr, seed=args.seed, gradient_checkpointing=False)
    cuda = args.device == "cuda"
    if which == "kiln":
        cfg = comfy.run_node("KilnLoraConfig", rank=args.rank, alpha=1.0, conv_rank=args.kiln_conv_rank,
                             conv_alpha=1.0, dropout=0.0, rank_dropout=0.0, module_dropout=0.0)[0]
        inputs = dict(model=ctx["model"], clip=ctx["clip"], dataset=ctx["cached"], lora_config=cfg, optimizer="AdamW",
                      lr_scheduler="constant", warmup_steps=0, grad_accum=1, max_grad_norm=0.0, precision=args.precision,
                      loss_type="l2", min_snr_gamma=0.0, mask_normalize=False, prior_loss_weight=1.0,
                      sample_prompts="", sample_every=0, sample_steps=1, sample_cfg=1.0, **common)
        node = "KilnTrainSD1"
    else:
        # TrainLoraNode is is_input_list=True: get_input_data wraps every plain (widget-like) input in a
        # one-element list, as the executor does; latents and positive come as lists of one entry per image,
        # as from native's own dataset nodes (see run_node_with_lists).
        with torch.inference_mode():
            lists = {"latents": [{"samples": lat[None]} for lat in ctx["latents"]],
                     "positive": [[c] for c in ctx["positive"]]}
        # training_dtype is native's autocast dtype; its LoRA weights stay fp32, as Kiln's do under autocast
        inputs = dict(model=ctx["model"], batch_size=args.batch, grad_accumulation_steps=1, rank=args.rank, optimizer="AdamW",
                      loss_function="MSE", training_dtype=args.precision, lora_dtype="fp32", algorithm="LoRA",
                      existing_lora="[None]", **common)
        node = "TrainLoraNode"
        filled = native_defaults(comfy.node_class(node), inputs)
        inputs.update(filled)

    gc.collect()
    baseline = settled_rss()
    log(f"{node}: {total} steps, baseline RSS {baseline / 2**20:.0f} MiB")
    clock = StepClock(total, args.warmup, cuda)
    if cuda:
        torch.cuda.synchronize()
        vram_baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    hwm_ok = reset_hwm()
    t0 = time.perf_counter()
    meter = SavedTensorMeter(clock, ctx["model"].model.diffusion_model, args.warmup)
    with clock.installed(comfy), meter.installed(), RssSampler(args.sample_interval) as sampler:
        if which == "kiln":
            out = comfy.run_node(node, **inputs)
        else:
            out = run_node_with_lists(comfy, node, lists, **inputs)
    node_seconds = time.perf_counter() - t0
    hwm = _status_kb("VmHWM") * 1024 if hwm_ok else None
    timing = clock.per_step(args.warmup, args.steps)
    w0, w1 = timing.pop("window")
    log(f"{node}: done in {node_seconds:.1f}s, {timing['seconds_per_step']:.4f} s/step")

    res = {"node": node, "node_seconds": node_seconds, "loadavg_1min_before_after": [load_before, os.getloadavg()[0]], "rss_baseline": baseline,
           "rss_peak_node": sampler.peak(), "rss_peak_steps": sampler.peak(w0, w1), "rss_hwm_node": hwm,
           "rss_samples": len(sampler.samples), "saved_for_backward": meter.summary(), **timing}
    if cuda:
        res.update(vram_baseline=vram_baseline, vram_peak_steps=clock.vram["steps"],
                   vram_peak_node=max(clock.vram["before_steps"], torch.cuda.max_memory_allocated()))
    if which == "native":
        res["native_inputs_at_default"] = filled  # what this ComfyUI's node added that the bench does not set
    if which == "kiln":
        lora = out[1]
        sd = lora.state_dict
        res["trainable_params"] = sum(v.numel() for k, v in sd.items() if k.endswith((".lora_down.weight", ".lora_up.weight")))
        res["lora_modules"] = sum(1 for k in sd if k.endswith(".lora_down.weight"))
        res["conv3x3_lora_modules"] = sum(1 for k, v in sd.items() if k.endswith(".lora_down.weight") and v.ndim == 4 and v.shape[-1] > 1)
        res["kiln_seconds_per_step_metadata"] = float(lora.metadata["kiln_seconds_per_step"])
        res["loss_start_end"] = [float(lora.metadata["kiln_probe_loss_start"]), float(lora.metadata["kiln_probe_loss_end"])]
        res["trains"] = "LoRA on Linear/1x1-conv in transformer blocks" + (
            " + ResNet/sampler convs" if args.kiln_conv_rank else "")
    else:
        # by type, not position: 0.3.75 outputs (MODEL, LORA_MODEL, LOSS_MAP, INT), 0.33 drops the MODEL
        types = list(comfy.node_class(node).RETURN_TYPES)
        lora_sd, loss_map = out[types.index("LORA_MODEL")], out[types.index("LOSS_MAP")]
        groups = {"lora": 0, "norm_diff": 0, "bias_diff": 0}
        for k, v in lora_sd.items():
            if k.endswith((".lora_up.weight", ".lora_down.weight", ".lora_mid.weight")):
                groups["lora"] += v.numel()
            elif k.endswith(".diff"):
                groups["norm_diff"] += v.numel()
            elif k.endswith(".diff_b"):
                groups["bias_diff"] += v.numel()
        res["trainable_params"] = sum(groups.values())
        res["trainable_breakdown"] = groups
        res["lora_modules"] = sum(1 for k in lora_sd if k.endswith(".lora_down.weight"))
        base = ctx["model"].model  # native's keys are module paths in BaseModel (diffusion_model.…)
        res["conv3x3_lora_modules"] = sum(
            1 for k in lora_sd if k.endswith(".lora_down.weight")
            and getattr(base.get_submodule(k[:-len(".lora_down.weight")]), "kernel_size", (1, 1)) != (1, 1))
        losses = loss_map["loss"]
        res["loss_first_last"] = [losses[0], losses[-1]] if losses else None
        res["trains"] = "LoRA on every >=2-D weight + full diffs of every norm weight and bias"
    # what training must add on top of the loaded model: params + grads + AdamW's two moments, all fp32
    res["lora_optimizer_state_bytes"] = res["trainable_params"] * 4 * 4
    del out
    gc.collect()
    return res


def worker(args, which: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        t0 = time.perf_counter()
        log("loading ComfyUI, checkpoint, latents, conditioning")
        ctx = prepare(args, Path(tmp))
        info = ctx["info"]
        info["setup_seconds"] = time.perf_counter() - t0
        log(f"set-up took {info['setup_seconds']:.1f}s")
        runs = {}
        for w in which:
            runs[w] = run_trainer(w, ctx, args)
            runs[w]["latents_sha"] = info["latents_sha"]
        return {"info": info, "runs": runs}


# --- driver -------------------------------------------------------------------------------------------

def contended(run: dict) -> bool:
    return run["other_load_cores"] > 0.25 or run["seconds_per_step"] > 1.25 * run["median_step"]


def run_isolated(args) -> dict:
    """Each trainer in its own fresh process (sequentially); a run that other processes' load disturbed is
    repeated up to --retries times and the least disturbed attempt kept. Returns the merged result."""
    merged = {"info": None, "runs": {}, "info_per_process": {}}
    for which in ("kiln", "native"):
        attempts = []
        for attempt in range(1 + args.retries):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out_path = f.name
            cmd = [sys.executable, __file__, "--_worker", which, "--_out", out_path] + args._passthrough
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"{which} worker failed with exit code {proc.returncode}")
            part = json.loads(Path(out_path).read_text())
            os.unlink(out_path)
            run = part["runs"][which]
            log(f"{which}: subprocess done in {time.perf_counter() - t0:.0f}s "
                f"(other processes' load {run['other_load_cores']:.2f} cores)")
            attempts.append((run["other_load_cores"], attempt, part))
            if not contended(run):
                break
            if attempt < args.retries:
                log(f"{which}: contended by other processes, running it again")
        _, _, part = min(attempts, key=lambda a: a[:2])
        part["runs"][which]["attempts"] = len(attempts)
        merged["info_per_process"][which] = part["info"]
        merged["info"] = merged["info"] or part["info"]
        merged["runs"][which] = part["runs"][which]
    shas = {w: (i["latents_sha"], i["positive_sha"]) for w, i in merged["info_per_process"].items()}
    merged["same_latents_across_processes"] = len(set(shas.values())) == 1
    return merged


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def report(result: dict, args) -> str:
    info, k, n = result["info"], result["runs"]["kiln"], result["runs"]["native"]
    ratio = k["seconds_per_step"] / n["seconds_per_step"]
    lines = []
    mode = ("one fresh process per trainer (Kiln, then native; never concurrent)" if result["mode"] == "subprocess"
            else "ONE process, Kiln first then native (second run's RSS shares the first's allocator)")
    lines.append(f"Kiln KilnTrainSD1 vs ComfyUI TrainLoraNode — {info['family']} {args.shape}-shaped checkpoint, "
                 f"{info['device']} ({info.get('device_name', 'cpu')}), torch {info['torch']}, {info['threads']} threads")
    lines.append(f"  {args.warmup} warm-up + {args.steps} timed steps, rank {args.rank} (scale 1/rank), batch {args.batch}, "
                 f"{args.resolution}px (latent {tuple(info['latent_shape'][1:])}), AdamW lr {args.lr:g}, {args.precision}, "
                 "no grad ckpt")
    lines.append(f"  mode: {mode}")
    same = result.get("same_latents_across_processes", True)
    lines.append(f"  inputs: {info['captions']} latents sha {info['latents_sha']}, conditioning sha {info['positive_sha']} "
                 f"(identical for both: {same});")
    lines.append(f"  conditioning check: max |CLIPTextEncode (native's) - clip.encode_from_tokens (Kiln's)| = "
                 f" {info['cond_max_abs_diff_native_vs_kiln_encode']:.2e}")
    lines.append(f"  model: UNet {info['unet_params'] / 1e6:.1f}M params = {mib(info['unet_param_bytes'])} MiB "
                 f"({info['unet_dtype']}), CLIP {mib(info['clip_param_bytes'])} MiB, VAE {mib(info['vae_param_bytes'])} MiB")
    lines.append("")
    hdr = f"{'':34}{'Kiln':>14}{'native':>14}"
    lines.append(hdr)
    lines.append("-" * len(hdr))

    def row(label, kv, nv):
        lines.append(f"{label:34}{kv:>14}{nv:>14}")

    row("s/step (mean of timed steps)", f"{k['seconds_per_step']:.4f}", f"{n['seconds_per_step']:.4f}")
    row("s/step (median step)", f"{k['median_step']:.4f}", f"{n['median_step']:.4f}")
    row("CPU s/step (all threads)", f"{k['cpu_seconds_per_step']:.4f}", f"{n['cpu_seconds_per_step']:.4f}")
    row("  of which kernel (sys)", f"{k['sys_seconds_per_step']:.4f}", f"{n['sys_seconds_per_step']:.4f}")
    row("other processes' load [cores] (!)", f"{k['other_load_cores']:.2f}", f"{n['other_load_cores']:.2f}")
    row("whole node wall time [s] (*)", f"{k['node_seconds']:.1f}", f"{n['node_seconds']:.1f}")
    row("trainable params", f"{k['trainable_params']:,}", f"{n['trainable_params']:,}")
    row("  LoRA modules (3x3 conv)", f"{k['lora_modules']} ({k['conv3x3_lora_modules']})",
        f"{n['lora_modules']} ({n['conv3x3_lora_modules']})")
    b = n["trainable_breakdown"]
    row("  native: lora/norm/bias params", "", f"{b['lora']:,}/{b['norm_diff']:,}/{b['bias_diff']:,}")
    row("params+grads+AdamW state [MiB]", mib(k["lora_optimizer_state_bytes"]), mib(n["lora_optimizer_state_bytes"]))
    row("RSS model loaded (baseline) [MiB]", mib(k["rss_baseline"]), mib(n["rss_baseline"]))
    row("peak RSS during steps [MiB]", mib(k["rss_peak_steps"]), mib(n["rss_peak_steps"]))
    row("peak RSS whole node [MiB]", mib(k["rss_peak_node"]), mib(n["rss_peak_node"]))
    row("kernel VmHWM whole node [MiB]", mib(k["rss_hwm_node"]), mib(n["rss_hwm_node"]))
    kd, nd = k["rss_peak_steps"] - k["rss_baseline"], n["rss_peak_steps"] - n["rss_baseline"]
    row("peak steps - baseline [MiB]", mib(kd), mib(nd))
    row("  ÷ UNet param bytes", f"{kd / info['unet_param_bytes']:.2f}", f"{nd / info['unet_param_bytes']:.2f}")
    if "vram_baseline" in k:
        row("VRAM model loaded (baseline) [MiB]", mib(k["vram_baseline"]), mib(n["vram_baseline"]))
        row("peak VRAM during steps [MiB]", mib(k["vram_peak_steps"]), mib(n["vram_peak_steps"]))
        row("peak VRAM whole node [MiB]", mib(k["vram_peak_node"]), mib(n["vram_peak_node"]))
    ks, ns = k["saved_for_backward"], n["saved_for_backward"]
    row("saved for backward/step [MiB]:", "", "")
    row("  activations", mib(ks["activations"]), mib(ns["activations"]))
    row("  copies of model weights", mib(ks["weight_copies"]), mib(ns["weight_copies"]))
    row("  aliases of model weights", mib(ks["model_alias"]), mib(ns["model_alias"]))
    lines.append("-" * len(hdr))
    noisy = [name for name, r in (("Kiln", k), ("native", n)) if r["seconds_per_step"] > 1.25 * r["median_step"]]
    busy = [name for name, r in (("Kiln", k), ("native", n)) if r["other_load_cores"] > 0.25]
    target = ("MET" if ratio <= 0.6 else "NOT met") + (", but contended: not conclusive" if noisy or busy else "")
    lines.append(f"ratio kiln/native s/step = {ratio:.3f}  (target <= 0.6: {target}); "
                 f"median-step ratio {k['median_step'] / n['median_step']:.3f}, "
                 f"CPU-time ratio {k['cpu_seconds_per_step'] / n['cpu_seconds_per_step']:.3f}")
    if result["mode"] == "subprocess" and max(k.get("attempts", 1), n.get("attempts", 1)) > 1:
        lines.append(f"runs: Kiln {k['attempts']}, native {n['attempts']} attempt(s); the least contended one is shown.")
    if noisy:
        lines.append(f"NOTE: mean step time of {' and '.join(noisy)} is >25% above its median: some steps were slowed; "
                     "compare the median ratio (step_seconds are in the JSON), or rerun.")
    if busy:
        if info["threads"] > 1:
            why = ("(torch's OpenMP threads that share cores with other work can slow down 10x or more). "
                   "Rerun on a quiet machine, or with --threads 1.")
        else:
            why = "(with one thread, wall time scales with the CPU share it got; the CPU-time ratio is steadier)."
        lines.append(f"NOTE: other processes used CPU while {' and '.join(busy)} trained: the timings are contended {why}")
    lines.append("(!) from /proc/stat: the whole machine's busy CPU time minus this process's, per second of timed steps.")
    lines.append("(*) Kiln's node also encodes the captions itself and runs a probe loss before/after and one 1-step "
                 "preview; native got pre-encoded conditioning. Neither is inside the timed steps.")
    budget = k["rss_baseline"] + k["lora_optimizer_state_bytes"] + (ks["activations"] or 0)
    copies = ks["weight_copies"] or 0
    verdict = ("no second model copy" if copies < 0.05 * info["unet_param_bytes"] and kd < info["unet_param_bytes"]
               else "no copy of the weights saved for backward" if copies < 0.05 * info["unet_param_bytes"]
               else "WEIGHT COPIES saved for backward")
    lines.append(f"Kiln memory: peak during steps {mib(k['rss_peak_steps'])} MiB vs baseline + LoRA/AdamW state + saved "
                 f"activations = {mib(budget)} MiB ({(k['rss_peak_steps'] - budget) / 2**20:+,.0f} MiB transient/slack); "
                 f"weight copies saved {mib(copies)} MiB of {mib(info['unet_param_bytes'])} MiB UNet: {verdict}.")
    lines.append(f"Native saves {mib(ns['weight_copies'])} MiB of materialized (patched) weights per step: "
                 f"{(ns['weight_copies'] or 0) / info['unet_param_bytes']:.2f} x the UNet's bytes.")
    lines.append(f"Kiln's own metadata kiln_seconds_per_step = {k['kiln_seconds_per_step_metadata']:.4f} "
                 f"(mean over all {args.warmup + args.steps} steps, warm-up included)")
    lines.append("Timing: progress-hook timestamps after each optimizer step; mean of the last "
                 f"{args.steps} steps = (t[{args.warmup + args.steps}] - t[{args.warmup}]) / {args.steps}; "
                 "excludes loading, VAE/text encoding, Kiln's probe loss and preview, native's adapter set-up.")
    lines.append("Memory: VmRSS sampled every "
                 f"{args.sample_interval * 1000:.0f} ms in a thread; VmHWM reset via /proc/self/clear_refs before each node; "
                 "saved-for-backward bytes from an identity saved_tensors_hooks during the warm-up steps (storages "
                 "deduplicated; 'copies' = new tensors shaped like a UNet parameter).")
    lines.append(f"Kiln trains: {k['trains']}; native trains: {n['trains']}.")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (>= 1)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64, help="training resolution (multiple of 64)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: ComfyUI picks the GPU (both trainers; peak VRAM is reported too)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="Kiln's precision and native's training_dtype (autocast; LoRA weights fp32 in both)")
    p.add_argument("--shape", choices=("tiny", "real"), default="tiny",
                   help="tiny: the test fixture's SD1; real: SD1.5's UNet shapes, random weights (bench/real_sd1.py)")
    p.add_argument("--kiln-conv-rank", type=int, default=0,
                   help="Kiln conv_rank (LoRA on ResNet 3x3 convs too, closer to native's targets); 0 = kohya default")
    p.add_argument("--mode", choices=("subprocess", "single"), default="subprocess",
                   help="subprocess: a fresh process per trainer (default, honest RSS); single: both in one process")
    p.add_argument("--retries", type=int, default=1,
                   help="subprocess mode: rerun a trainer up to N times when other processes' load disturbed it")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default (all cores)")
    p.add_argument("--sample-interval", type=float, default=0.005, help="RSS sampling interval in seconds")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--_worker", choices=("kiln", "native", "both"), help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if args.resolution % 64:
        p.error("--resolution must be a multiple of 64")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
    args._passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--rank={args.rank}",
                         f"--batch={args.batch}", f"--resolution={args.resolution}", f"--lr={args.lr}",
                         f"--seed={args.seed}", f"--kiln-conv-rank={args.kiln_conv_rank}",
                         f"--sample-interval={args.sample_interval}", f"--threads={args.threads}",
                         f"--device={args.device}", f"--precision={args.precision}", f"--shape={args.shape}"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        which = ["kiln", "native"] if args._worker == "both" else [args._worker]
        result = worker(args, which)
        args._out.write_text(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    if args.mode == "subprocess":
        result = run_isolated(args)
    else:
        result = worker(args, ["kiln", "native"])
    result["mode"] = args.mode
    result["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    k, n = result["runs"]["kiln"], result["runs"]["native"]
    result["ratio_kiln_over_native"] = k["seconds_per_step"] / n["seconds_per_step"]
    result["bench_seconds"] = time.perf_counter() - t0
    text = report(result, args)
    print(text)
    result["table"] = text
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"(JSON written to {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
