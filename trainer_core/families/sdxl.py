"""SDXL (and SSD-1B, Segmind Vega, KOALA): the SD1 objective and UNet targets, SGM module names, two text
encoders and the size/crop micro-conditioning.

* Objective: DDPM ε or v (the model's own sampling type), the same maths as SD1 (``sd1.SD1Objective``).
* Targets: kohya's SDXL LoRA selects the same transformer (and, with a conv rank, ResNet/sampler) layers
  as SD1, so the rules are ``sd1.unet_rules``; names stay in the original SGM layout
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), which kohya writes and ComfyUI maps.
* Conditioning: context = [CLIP-L | CLIP-G] penultimate states (77 × 2048); y = CLIP-G pooled (1280) +
  six Fourier-embedded numbers: original size, crop top-left and target size, from each sample's bucketing.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.transforms import Geometry
from .sd1 import SD1Objective, checkpoint_blocks, unet_rules

__all__ = ["SD1Objective", "checkpoint_blocks", "unet_rules", "unet_namer", "size_condition", "SizeCondition",
           "UNET_PREFIX", "TE_PREFIXES", "ARCHITECTURE", "BASE_MODEL_VERSION"]  # the SD1 parts this family shares

UNET_PREFIX = "lora_unet"
TE_PREFIXES = {"clip_l": "lora_te1", "clip_g": "lora_te2"}  # kohya's sdxl names
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
BASE_MODEL_VERSION = "sdxl_base_v1-0"


def unet_namer(unet=None):
    return lambda path: f"{UNET_PREFIX}_{path.replace('.', '_')}"


@dataclass(frozen=True)
class SizeCondition:
    """SDXL's micro-conditioning for one sample, in pixels (kohya: original_size, crop_top_left, target_size)."""
    original_width: int
    original_height: int
    crop_left: int
    crop_top: int
    target_width: int
    target_height: int


def size_condition(g: Geometry) -> SizeCondition:
    """From the sample's bucketing: the file's size, where the bucket window sits in the resized image (mirrored
    when the sample is flipped, as kohya does), and the bucket size."""
    left = g.crop_left
    if g.flip:
        left = g.resized[0] - g.bucket[0] - g.crop_left
    return SizeCondition(g.original_size[0], g.original_size[1], left, g.crop_top, g.bucket[0], g.bucket[1])
