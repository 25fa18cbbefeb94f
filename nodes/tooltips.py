"""Tooltips that several nodes' inputs share (the sockets, and the sampler settings of the nodes that sample), so
each is written once."""
from __future__ import annotations

MODEL = "The model from Load Checkpoint (or any node giving a MODEL)."
CLIP = "The CLIP from the same Load Checkpoint (or a CLIP loader)."
VAE = "The VAE from the same Load Checkpoint (or Load VAE)."
DATASET = "The dataset from Load Dataset or Dataset from Images (through Alpha/Mask Source and Cache Latents)."
TRAIN_DATASET = "The dataset after Cache Latents (its latents are what trains)."
LORA_CONFIG = "The LoRA's shape from LoRA Config (rank, alpha, algorithm)."

SAMPLER = {
    "negative": "Negative prompt.",
    "width": "Image width in pixels.",
    "height": "Image height in pixels.",
    "steps": "Sampling steps per image.",
    "cfg": "CFG scale, as KSampler's.",
    "sampler_name": "ComfyUI's sampler, as KSampler's.",
    "scheduler": "ComfyUI's scheduler, as KSampler's.",
    "seed": "Seed of the noise, as KSampler's.",
}
