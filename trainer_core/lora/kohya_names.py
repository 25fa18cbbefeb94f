"""kohya LoRA names for UNet modules.

SD1/SD2 LoRAs name UNet modules the diffusers way (``lora_unet_down_blocks_0_attentions_0_...``),
which is what kohya writes and what ComfyUI, A1111 and Forge all map back; SDXL and SD3 LoRAs use the
host's own module path (``lora_unet_input_blocks_4_1_...``). The conversion below is derived from the
block structure of a compvis-layout UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``).
"""
from __future__ import annotations

from torch import nn

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _kind(m: nn.Module) -> str:
    name = type(m).__name__
    if name in ("ResBlock", "SpatialTransformer", "Downsample", "Upsample"):
        return name
    return "other"


def _resnet_part(rest: str) -> str:
    for k, v in _RESNET.items():
        if rest == k or rest.startswith(k + "."):
            return v + rest[len(k):]
    return rest


class CompvisToDiffusers:
    """Maps compvis UNet module paths to diffusers paths for one UNet instance."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        inputs = list(unet.input_blocks)
        down = [i for i, blk in enumerate(inputs) if any(_kind(m) == "Downsample" for m in blk)]
        # input_blocks = [conv_in] + per level: N resnets (+ attention) then one downsampler
        self.n_res = (down[0] - 1) if down else len(inputs) - 1

    def _block(self, container: str, idx: int, k: int, rest: str, level: int, j: int, prefix: str) -> str:
        m = getattr(self.unet, container)[idx][k]
        kind = _kind(m)
        if kind == "ResBlock":
            return f"{prefix}.{level}.resnets.{j}.{_resnet_part(rest)}"
        if kind == "SpatialTransformer":
            return f"{prefix}.{level}.attentions.{j}.{rest}"
        if kind == "Downsample":
            return f"{prefix}.{level}.downsamplers.0.conv" + rest[len("op"):]
        if kind == "Upsample":
            return f"{prefix}.{level}.upsamplers.0.{rest}"
        raise KeyError(f"no diffusers name for {container}.{idx}.{k}.{rest}")

    def __call__(self, path: str) -> str:
        parts = path.split(".")
        head = parts[0]
        if head == "input_blocks":
            idx, k, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            if idx == 0:
                return "conv_in" + ("." + rest if rest else "")
            level, j = divmod(idx - 1, self.n_res + 1)
            return self._block(head, idx, k, rest, level, j, "down_blocks")
        if head == "middle_block":
            k, rest = int(parts[1]), ".".join(parts[2:])
            kind = _kind(self.unet.middle_block[k])
            if kind == "ResBlock":
                return f"mid_block.resnets.{0 if k == 0 else 1}.{_resnet_part(rest)}"
            return f"mid_block.attentions.0.{rest}"
        if head == "output_blocks":
            idx, k, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            level, j = divmod(idx, self.n_res + 1)
            return self._block(head, idx, k, rest, level, j, "up_blocks")
        mapping = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                   "out.0": "conv_norm_out", "out.2": "conv_out"}
        return mapping.get(path, path)


def kohya_name(prefix: str, path: str) -> str:
    """``lora_unet`` + ``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{prefix}_{path.replace('.', '_')}"
