"""SD 1.x / 2.x: DDPM noise schedule from the model itself, epsilon or v-prediction, compvis UNet.

Targets follow kohya's networks/lora.py: every Linear and 1x1 Conv inside the transformer blocks
(attention q/k/v/out, feed-forward, proj_in/out); with a conv rank, also the ResNet, down- and
up-sampler convolutions (3x3 at the conv rank, the rest at the normal rank).
"""
from __future__ import annotations

import torch
from torch import nn

from ..lora.kohya_names import CompvisToDiffusers, kohya_name
from ..lora.targets import TargetRule
from ..maths.losses import huber_threshold, snr_loss_weight
from ..maths.noise import input_noise, shaped_noise
from ..training.config import NoiseConfig
from .common import NoisyBatch

UNET_PREFIX = "lora_unet"
_TRANSFORMER = r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\..+)"
_RESNET_AND_SAMPLERS = r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.(in_layers|out_layers|emb_layers|skip_connection|op|conv)(\.\d+)?"


def unet_rules(rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float = 1.0) -> list[TargetRule]:
    rules = [TargetRule(_TRANSFORMER, ("linear", "conv1x1"), rank, alpha)]
    if conv_rank > 0:
        rules += [TargetRule(_RESNET_AND_SAMPLERS, ("conv3x3",), conv_rank, conv_alpha),
                  TargetRule(_RESNET_AND_SAMPLERS, ("linear", "conv1x1"), rank, alpha)]
    return rules


def unet_namer(unet: nn.Module):
    to_diffusers = CompvisToDiffusers(unet)
    return lambda path: kohya_name(UNET_PREFIX, to_diffusers(path))


def checkpoint_blocks(unet: nn.Module) -> list[nn.Module]:
    """The layers of the UNet's top-level blocks (ResBlocks, transformers, resamplers), in the order they run: the
    unit of gradient checkpointing and block swap. Not the blocks themselves: ComfyUI's UNet runs each block's
    layers in a loop (forward_timestep_embed) and never calls the block, so a hook or wrapper on it never runs."""
    return [layer for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks) for layer in block]


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891), kohya's zero_terminal_snr: √ᾱ shifted so its last value is 0 and
    rescaled so its first is unchanged (kohya rewrites the betas; the resulting ᾱ is the same)."""
    s = alphas_cumprod.double().sqrt()
    s0, st = s[0].clone(), s[-1].clone()
    return ((s - st) * s0 / (s0 - st)) ** 2


class SD1Objective:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at integer t in [min_timestep, max_timestep), target ε (or
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x0); kohya's noise options shape ε (noise.py)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "eps",
                 min_timestep: int | None = None, max_timestep: int | None = None,
                 noise: NoiseConfig | None = None, zsnr: bool = False):
        if prediction not in ("eps", "v"):
            raise ValueError(f"SD1/SD2 prediction must be eps or v, got {prediction}")
        self.acp = alphas_cumprod.double().cpu()
        if zsnr:
            self.acp = zero_terminal_snr(self.acp)
        self.prediction = prediction
        self.num_timesteps = len(self.acp)
        self.min_t = min_timestep or 0
        self.max_t = self.num_timesteps if max_timestep is None else max_timestep
        self.noise = NoiseConfig() if noise is None else noise

    def sample(self, x0: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        b = x0.shape[0]
        if self.min_t < self.max_t:
            t = torch.randint(self.min_t, self.max_t, (b,), generator=generator)
        else:  # kohya: min_timestep == max_timestep trains that one timestep
            t = torch.full((b,), self.max_t, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        noise = shaped_noise(x0, noise, self.noise, generator)
        return self.at(x0, t, noise, input_noise(noise, self.noise, generator))

    def at(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, noised_with: torch.Tensor | None = None) -> NoisyBatch:
        """``noised_with`` (input perturbation) goes into x_t in place of ``noise``; the target keeps ``noise``."""
        acp = self.acp[t.cpu()].to(x0.device)
        a = acp.sqrt().to(x0.dtype).view(-1, 1, 1, 1)
        s = (1 - acp).sqrt().to(x0.dtype).view(-1, 1, 1, 1)
        x_t = a * x0 + s * (noise if noised_with is None else noised_with)
        target = noise if self.prediction == "eps" else a * noise - s * x0
        return NoisyBatch(x_t, t.to(x0.device).float(), target, (acp / (1 - acp)).float())

    def huber_c(self, nb: NoisyBatch, schedule: str, c: float, scale: float) -> torch.Tensor:
        return huber_threshold(schedule, c, scale, nb.timesteps, self.num_timesteps, self.acp)

    def loss_weight(self, snr: torch.Tensor, loss) -> torch.Tensor:
        """kohya's post-processing weights after min-SNR (scale_v_pred_loss_like_noise_pred, v_pred_like_loss,
        debiased_estimation_loss), from the run's loss settings (TrainConfig.loss)."""
        return snr_loss_weight(snr, self.prediction == "v", loss.scale_v_pred_loss_like_noise_pred,
                               loss.v_pred_like_loss or 0.0, loss.debiased_estimation_loss)

    def output(self, pred: torch.Tensor, nb: NoisyBatch) -> torch.Tensor:
        """The prediction in the space of ``nb.target`` (SD1/SD2 compare it as it is)."""
        return pred

    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ (Hang et al. 2023) as kohya applies it, per sample."""
        if self.prediction == "eps":  # zero-terminal-SNR schedules reach snr = 0: weight 1 there, not 0/0
            return torch.where(snr > 0, torch.clamp(snr, max=gamma) / snr.clamp_min(1e-12), torch.ones_like(snr))
        return torch.clamp(snr, max=gamma) / (snr + 1)


def modelspec_architecture(is_v: bool, is_sd2: bool, lora: bool = True) -> str:
    """modelspec.architecture of a LoRA for this model, or of the model itself (a full fine-tune)."""
    arch = ("stable-diffusion-v2-768-v" if is_v else "stable-diffusion-v2-512") if is_sd2 else "stable-diffusion-v1"
    return arch + "/lora" if lora else arch
