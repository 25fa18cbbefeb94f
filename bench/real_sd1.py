"""An SD1.5-shaped checkpoint with random weights, for benches that need the real UNet's cost (860M parameters).

No model hub is reachable, so, like the test fixtures (tests/fixtures/tiny_models.py, whose writer and CLIP/VAE it
reuses), the file is generated: SD1.5's UNet (the configuration ComfyUI's model detection gives SD15), the full
CLIP-L, and TAESD as the VAE (cheap to encode 512² images). CheckpointLoaderSimple detects it as SD15. ~2 GB in
fp16; built once into the fixture cache (seconds on a 16-core machine, a minute or more on 2 cores).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures import tiny_models as tm  # noqa: E402

# SD1.5: four levels of two res blocks, attention on the first three; what detect_unet_config derives from its keys.
REAL_SD1_UNET_CONFIG = dict(tm.SD1_UNET_CONFIG, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def real_sd1_name(seed: int = 0) -> str:
    return f"kiln-real-sd1-v{tm.FORMAT_VERSION}-s{seed}.safetensors"


def build_real_sd1_checkpoint(path: str, seed: int = 0) -> str:
    """Write the checkpoint at ``path`` unless it exists; returns ``path``."""
    if os.path.exists(path):
        return path
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    parts = tm._sd1_modules()  # the fixture's CLIP-L and TAESD under their checkpoint prefixes
    with torch.device("meta"):
        parts["model.diffusion_model."] = UNetModel(**REAL_SD1_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    return tm._write_checkpoint(path, parts, seed, "sd1-real")
