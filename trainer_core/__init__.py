"""Kiln's standalone LoRA trainer: torch, safetensors, numpy and Pillow only, never ComfyUI.

The ComfyUI nodes are thin adapters around this package (see nodes/comfy/), so everything
here can be unit-tested, and run headless, without a ComfyUI install.
"""
