"""Trainer overhead: Kiln's whole training step against the raw forward + backward of the same network.

    $KILN_PYTHON bench/train_overhead.py [--families sdxl,sd3] [--steps 10] [--warmup 3] [--rank 32]
                                         [--resolution N] [--checkpointing both|on|off] [--json out.json]

The floor a LoRA trainer is measured against is one forward and one backward pass through the frozen
network (gradients flow to the input, no weight gradients): that is what any LoRA step must do. Kiln's step
is trainer_core.training.loop.train as the Train nodes run it (cached latents and cached text-encoder outputs,
timestep sampling, loss, LoRA forward/backward, gradient clipping, AdamW, LR schedule), timed between
optimizer steps after a warm-up. Both run on the same module, inputs and precision in the same process.

On a CUDA GPU: the real architecture shapes with random weights (SDXL base UNet at 1024², SD3-medium MMDiT at
1024², FLUX.1 dev's 19 double + 38 single blocks at 1024² with 512 T5 tokens), bf16, batch 1, rank 32; it/s and peak VRAM (torch.cuda.max_memory_allocated) for each, with and
without gradient checkpointing. Targets (H100): overhead ≤ 10 % over the raw step; SDXL ≥ 3.3 it/s without
checkpointing; peak VRAM ≤ 8 GB with checkpointing. Without a GPU the same comparison runs on the CPU in
fp32 on the test fixtures' shapes (SD1 UNet, KOALA-shaped SDXL UNet, 2-block MMDiT, the 1 + 1-block Flux at
the width this ComfyUI detects: 3072 on 0.3.75, 256 on newer) at 64², where the ratio, not the it/s, is the figure.
Flux runs as the Train node runs it: ComfyUI's in_training flag set and its norms handed input copies (its blocks
add residuals in place), in both the raw and Kiln's step.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def setup_comfy(cpu: bool) -> None:
    from fixtures.tiny_models import ensure_comfy_importable

    ensure_comfy_importable()
    if cpu:
        sys.argv = [sys.argv[0], "--cpu"]
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu


def build(family: str, real: bool, device, dtype) -> tuple[torch.nn.Module, dict, int]:
    """(network, conditioning for batch 1, latent channels) with random weights of the family's shapes
    ("sd35l": SD3.5 Large's MMDiT, real shapes only; "flux": FLUX.1 dev)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from fixtures import tiny_models as tm

    ops = comfy.ops.disable_weight_init
    if family == "sd3":
        cfg = dict(tm.SD3_MMDIT_CONFIG)
        if real:  # SD3 medium: depth 24 (hidden 1536), 192² position table
            cfg.update(depth=24, num_patches=192 * 192, pos_embed_max_size=192,
                       context_embedder_config={"target": "torch.nn.Linear",
                                                "params": {"in_features": 4096, "out_features": 1536}})
    if family == "sd35l":  # SD3.5 Large: depth 38 (hidden 2432), q/k RMS norms
        cfg = dict(tm.SD3_MMDIT_CONFIG, depth=38, num_patches=192 * 192, pos_embed_max_size=192, qk_norm="rms",
                   context_embedder_config={"target": "torch.nn.Linear",
                                            "params": {"in_features": 4096, "out_features": 2432}})
    if family == "flux":  # FLUX.1 dev: 19 double + 38 single blocks, 3072 wide, T5-XXL context (512 tokens)
        net = tm._flux_module("flux-dev", 3072, 19, 38, 4096) if real else \
            tm._flux_module("flux-dev", tm.flux_width("flux-dev"))
        cond = {"context": torch.randn(1, 512 if real else 77, 4096 if real else tm.FLUX_CONTEXT),
                "y": torch.randn(1, 768), "guidance": torch.ones(1)}
        channels = 16
    elif family in ("sd3", "sd35l"):
        with torch.device("meta"):
            net = OpenAISignatureMMDITWrapper(**cfg, operations=ops)
        cond = {"context": torch.randn(1, 154 if real else 77, 4096), "y": torch.randn(1, 2048)}
        channels = 16
    else:
        if family == "sd1":
            cfg, ctx, y = dict(tm.SD1_UNET_CONFIG), 768, None
        else:
            cfg, ctx, y = dict(tm.SDXL_UNET_CONFIG), 2048, 2816
            if real:  # SDXL base
                cfg.update(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                           transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
        with torch.device("meta"):
            net = UNetModel(**cfg, operations=ops)
        cond = {"context": torch.randn(1, 77, ctx)}
        if y:
            cond["y"] = torch.randn(1, y)
        channels = 4
    net = net.to_empty(device=device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith(("weight", "scale")) else 0.0)  # norms (Flux's RMSNorm: scale)
            else:
                p.normal_(0, 1 / math.sqrt(max(1, p[0].numel())))
        for name, b in net.named_buffers():
            if name.endswith("pos_embed"):
                b.copy_(tm._sincos_pos_embed(b.shape))
    net.to(dtype).requires_grad_(False).eval()
    return net, cond, channels


@dataclass
class Setup:
    """One benchmark network with its inputs, as every script in bench/ times it."""
    family: str
    net: torch.nn.Module
    cond: dict
    x0: torch.Tensor
    blocks: list
    device: torch.device
    dtype: torch.dtype
    precision: str
    real: bool

    def forward(self, x, timesteps, c):
        gpu = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=gpu):
            return self.net(x.to(self.dtype), timesteps, context=c["context"], **{k: c[k] for k in ("y", "guidance")
                                                                                   if k in c})

    def training(self):
        """What the Train node wraps a training network in (nodes/comfy/model.py training_session): for Flux,
        ComfyUI's in_training flag (backward-safe kernels) and input copies for its norms (in-place residuals)."""
        if self.family != "flux":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(_pack_file("nodes/comfy/compat.py").in_training())
        stack.enter_context(_pack_file("nodes/comfy/tensors.py").norm_input_copies(self.net))
        return stack

    @property
    def timestep(self) -> torch.Tensor:
        """A mid-schedule timestep in the network's units: σ for Flux, the DDPM index / σ·1000 for the others."""
        return torch.tensor([0.5 if self.family == "flux" else 500.0], device=self.device)

    @property
    def params_m(self) -> float:
        return sum(p.numel() for p in self.net.parameters()) / 1e6


def _pack_file(path: str):
    """One of the pack's dependency-free modules (nodes/comfy/compat.py, tensors.py) loaded by its path, as cli.py
    loads compat.py: importing ``nodes`` here would find ComfyUI's own nodes.py."""
    name = f"kiln_bench_{Path(path).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def prepare(family: str, real: bool | None = None, resolution: int | None = None) -> Setup:
    """The family's network on the GPU in bf16 (real shapes, 1024²) or on the CPU in fp32 (fixture shapes, 64²)
    unless told otherwise, with a batch-1 latent and conditioning."""
    from trainer_core.families import flux, sd1, sd3

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype, precision = (torch.bfloat16, "bf16") if gpu else (torch.float32, "fp32")
    real = gpu if real is None else real
    res = resolution or (1024 if gpu else 64)
    net, cond, channels = build(family, real, device, dtype)
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    x0 = torch.randn(1, channels, res // 8, res // 8, device=device, dtype=dtype)
    blocks = sd3.checkpoint_blocks(net) if family in ("sd3", "sd35l") else \
        flux.checkpoint_blocks(net) if family == "flux" else sd1.checkpoint_blocks(net)
    return Setup("sd3" if family == "sd35l" else family, net, cond, x0, blocks, device, dtype, precision, real)


def peak_memory_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def raw_step(b: Setup, t, steps, warmup, checkpointing) -> float:
    """Seconds per forward + backward of the frozen network (gradient to the input only)."""
    from trainer_core.memory.checkpointing import gradient_checkpointing

    with b.training(), gradient_checkpointing(b.blocks, checkpointing):
        for i in range(warmup + steps):
            if i == warmup:
                sync(b.device)
                start = time.perf_counter()
            x = b.x0.clone().requires_grad_(True)
            out = b.forward(x, t, b.cond)
            out.float().pow(2).mean().backward()
    sync(b.device)
    return (time.perf_counter() - start) / steps


def step_bench_args(doc: str) -> argparse.Namespace:
    """The options of the scripts that time loop.train variants against each other (algorithms.py,
    better_loras.py), parsed, with the CPU thread count applied."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--family", default="sd1", choices=("sd1", "sdxl", "sd3", "flux"))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def kiln_step(b: Setup, rank, steps, warmup, checkpointing=False, clock=time.perf_counter, network_options=None,
              swap=0, **options):
    """(seconds per optimizer step of trainer_core.training.loop.train, the LoRANetwork it trained); ``network_options``:
    LoRANetwork arguments (e.g. algorithm), ``swap``: blocks_to_swap as the Train nodes apply it, ``options``:
    more TrainConfig fields (e.g. optimizer_type)."""
    from trainer_core.memory.block_swap import block_swap
    from trainer_core.data.cache import CachedSample, LatentCache
    from trainer_core.data.transforms import plan_geometry
    from trainer_core.families import flux, sd1, sd3
    from trainer_core.options import registry
    from trainer_core.lora.network import LoRANetwork
    from trainer_core.training.loop import TrainConfig, train

    swapped = b.blocks
    if b.family == "sd3":
        rules, name = sd3.SD3LayerRanks.from_args({}, rank, sd3.depth_of(b.net)).rules(rank), sd3.unet_namer
        objective = sd3.SD3Objective("logit_normal")
    elif b.family == "flux":  # kohya's flux_train_network defaults (the Train node's widgets), σ as the timestep
        rules, name = flux.rules({}, rank, rank, *flux.check_shape(b.net), "bench"), flux.unet_namer
        objective = flux.objective({o.name: o.default for o in registry.widgets("flux")}, lambda sigma: sigma)
        if swap:
            swapped = flux.swap_blocks(b.net, swap)
            swap = len(swapped)
    else:
        rules, name = sd1.unet_rules(rank, rank), (lambda p: "lora_unet_" + p.replace(".", "_"))
        objective = sd1.SD1Objective(torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64))
    network = LoRANetwork(b.net, rules, name, seed=0, **(network_options or {}))
    h, w = b.x0.shape[-2:]
    geometry = plan_geometry((w * 8, h * 8), (w * 8, h * 8))
    samples = [CachedSample(b.x0[0].float().cpu(), None, "a", 1, False, geometry, f"bench{i}") for i in range(4)]
    cache = LatentCache(samples, None, "bench")
    stamps = []
    cfg = TrainConfig(steps=warmup + steps, learning_rate=1e-4, batch_size=1, precision=b.precision,
                      gradient_checkpointing=checkpointing, **options)

    def on_step(info):
        sync(b.device)
        stamps.append(clock())

    with network.attached(), b.training(), block_swap(swapped, swap, b.device):
        train(network, objective, b.forward, lambda caps, train=False, geometries=None: b.cond, cache, lambda z: z,
              cfg, b.device, b.blocks, on_step)
    return (stamps[-1] - stamps[warmup - 1]) / steps, network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=None,
                    help="comma list of sd1, sdxl, sd3, flux (default: sdxl,sd3 on GPU, sd1,sdxl,sd3 on CPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 1024 on GPU, 64 on CPU)")
    ap.add_argument("--checkpointing", choices=("both", "on", "off"), default="both")
    ap.add_argument("--shape", choices=("real", "fixture"), default=None,
                    help="architecture shapes (default: real on a GPU, the test fixtures' on the CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    setup_comfy(cpu=not gpu)
    families = (args.families or ("sdxl,sd3" if gpu else "sd1,sdxl,sd3")).split(",")
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    rows = []
    for family in families:
        b = prepare(family, args.shape == "real" if args.shape else None, args.resolution)
        res = b.x0.shape[-1] * 8
        t = b.timestep
        for ckpt in modes:
            peak_memory_reset(b.device)
            raw = raw_step(b, t, args.steps, args.warmup, ckpt)
            raw_mem = peak_memory_mib(b.device)
            peak_memory_reset(b.device)
            kiln, network = kiln_step(b, args.rank, args.steps, args.warmup, ckpt)
            kiln_mem = peak_memory_mib(b.device)
            modules = len(network)
            row = dict(family=family, device=torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}",
                       shape="real" if b.real else "fixture", params_m=round(b.params_m, 1), resolution=res,
                       rank=args.rank, checkpointing=ckpt, lora_modules=modules, raw_s=raw, kiln_s=kiln,
                       raw_it_s=1 / raw, kiln_it_s=1 / kiln, overhead=kiln / raw - 1, raw_peak_mib=raw_mem,
                       kiln_peak_mib=kiln_mem)
            rows.append(row)
            print(f"{family:5} {row['shape']:7} {b.params_m:7.1f}M {res}px ckpt={'on ' if ckpt else 'off'} "
                  f"raw {1 / raw:7.2f} it/s  kiln {1 / kiln:7.2f} it/s  overhead {100 * (kiln / raw - 1):+6.1f}%  "
                  f"peak {raw_mem:8.0f} / {kiln_mem:8.0f} MiB  ({modules} LoRA modules)", flush=True)
        b = network = None  # free it before the next family is built
        if gpu:
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
