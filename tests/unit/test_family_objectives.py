"""SD1/SDXL/SD3 keep their losses on the family layer: for the same batch, seed and settings, the objective the layer
builds gives the losses the objective of before gave (float tolerance).

``Before*`` below are the objectives of trainer_core/families/ as they were before the family layer (commit 36ed04b:
sd1.SD1Objective, which SDXL shares, and sd3.SD3Objective), kept here verbatim in their maths as the reference; the
layer's objective comes from ``layer_objective``. A toy network (fixed random 1x1 convolution of x_t plus a timestep
term) stands in for the diffusion model so every part of the objective (draw, noising, network timestep, output
transform, target, weights) reaches the loss."""
from __future__ import annotations

import math

import pytest
import torch

from trainer_core.training.config import TrainConfig
from trainer_core.maths.losses import elementwise, per_sample_loss, snr_loss_weight


# --- the objectives before the family layer (reference) -------------------------------------------------------

class BeforeDDPM:
    def __init__(self, acp, prediction, min_t=None, max_t=None):
        self.acp, self.prediction = acp.double(), prediction
        self.min_t, self.max_t = min_t or 0, len(acp) if max_t is None else max_t

    def draw(self, x0, g):
        t = torch.randint(self.min_t, self.max_t, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        acp = self.acp[t]
        a, s = acp.sqrt().float().view(-1, 1, 1, 1), (1 - acp).sqrt().float().view(-1, 1, 1, 1)
        target = noise if self.prediction == "eps" else a * noise - s * x0
        return a * x0 + s * noise, t.float(), target, (acp / (1 - acp)).float(), None, lambda pred: pred


class BeforeSD3:
    def __init__(self, scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, shift=1.0, min_t=0, max_t=1000):
        self.scheme, self.lm, self.ls, self.ms, self.shift, self.min_t, self.max_t = \
            scheme, logit_mean, logit_std, mode_scale, shift, min_t, max_t

    def draw(self, x0, g):
        n = x0.shape[0]
        if self.scheme == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64) * self.ls + self.lm)
        else:
            u = torch.rand(n, generator=g, dtype=torch.float64)
            if self.scheme == "mode":
                u = 1 - u - self.ms * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        u = u * self.shift / (1 + (self.shift - 1) * u)
        t = (u * (self.max_t - self.min_t) + self.min_t).long()
        noise = torch.randn(x0.shape, generator=g)
        sigma = t.double() / 1000
        s = sigma.float().view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        if self.scheme == "sigma_sqrt":
            w = sigma.clamp_min(1e-3) ** -2.0
        elif self.scheme == "cosmap":
            w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
        else:
            w = torch.ones_like(sigma)
        snr = ((1 - sigma) / sigma.clamp_min(1e-3)) ** 2
        return x_t, t.float(), x0, snr.float(), w.float(), lambda pred: x_t - s * pred


# --- the same loss computed both ways ---------------------------------------------------------------------------

def toy_network(channels: int):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(channels, channels, generator=g) / channels ** 0.5
    return lambda x_t, t: torch.einsum("oc,bchw->bohw", w, x_t) + (t.float() / 1000).view(-1, 1, 1, 1)


def before_loss(obj, x0, seed, min_snr_gamma=0.0, cfg=None):
    x_t, t, target, snr, w, output = obj.draw(x0, torch.Generator().manual_seed(seed))
    pred = toy_network(x0.shape[1])(x_t, t)
    per = per_sample_loss(elementwise(output(pred), target, "l2", None), None, False)
    if w is not None:
        per = per * w
    if min_snr_gamma:
        per = per * (torch.clamp(snr, max=min_snr_gamma) / snr if obj.prediction == "eps"
                     else torch.clamp(snr, max=min_snr_gamma) / (snr + 1))
    if cfg is not None and isinstance(obj, BeforeDDPM):
        loss = cfg.loss
        per = per * snr_loss_weight(snr, obj.prediction == "v", loss.scale_v_pred_loss_like_noise_pred,
                                    loss.v_pred_like_loss or 0.0, loss.debiased_estimation_loss)
    return per.mean(), t


def layer_loss(obj, x0, seed, cfg, min_snr_gamma=0.0):
    nb = obj.sample(x0, torch.Generator().manual_seed(seed))
    pred = toy_network(x0.shape[1])(nb.x_t, nb.timesteps)
    per = per_sample_loss(elementwise(obj.output(pred, nb), nb.target, "l2", None), None, False)
    if nb.weight is not None:
        per = per * nb.weight
    if min_snr_gamma:
        per = per * obj.min_snr_weight(nb.snr, min_snr_gamma)
    if (post := obj.loss_weight(nb.snr, cfg.loss)) is not None:
        per = per * post
    return per.mean(), nb.timesteps


def ddpm_table():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    return acp, ((1 - acp) / acp).sqrt()  # ᾱ and ComfyUI's σ table of the same schedule


def layer_objective(family: str, sigmas: torch.Tensor | None, prediction: str, cfg: TrainConfig, opts: dict):
    """The objective the family layer builds for ``family`` from ComfyUI's model-sampling data (plain tensors)."""
    from trainer_core.families import layer
    sampling = layer.Sampling(prediction, sigmas=sigmas, multiplier=1000.0)
    return layer.objective(layer.FAMILIES[family], sampling, cfg, opts)


@pytest.mark.parametrize("family,prediction,seed,opts", [
    ("sd1", "eps", 0, {}), ("sd1", "v", 1, {}), ("sdxl", "eps", 2, {"min_timestep": 100, "max_timestep": 700}),
    ("sd1", "v", 3, {"scale_v_pred_loss_like_noise_pred": True, "v_pred_like_loss": 0.3}),
    ("sdxl", "eps", 4, {"debiased_estimation_loss": True}),
])
def test_ddpm_families_keep_their_losses(family, prediction, seed, opts):
    acp, sigmas = ddpm_table()
    cfg = TrainConfig(**opts)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
    before, t0 = before_loss(BeforeDDPM(acp, prediction, opts.get("min_timestep"), opts.get("max_timestep")), x0,
                             seed, 5.0, cfg)
    after, t1 = layer_loss(layer_objective(family, sigmas, prediction, cfg, {}), x0, seed, cfg, 5.0)
    assert torch.equal(t0, t1)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-7), (before, after)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
@pytest.mark.parametrize("shift,min_t,max_t", [(1.0, 0, 1000), (3.0, 50, 900)])
def test_sd3_keeps_its_losses(scheme, shift, min_t, max_t):
    opts = dict(weighting_scheme=scheme, logit_mean=0.2, logit_std=1.3, mode_scale=1.29, training_shift=shift)
    cfg = TrainConfig(min_timestep=min_t, max_timestep=max_t)
    x0 = torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    before, t0 = before_loss(BeforeSD3(scheme, 0.2, 1.3, 1.29, shift, min_t, max_t), x0, 5)
    after, t1 = layer_loss(layer_objective("sd3", None, "flow", cfg, opts), x0, 5, cfg)
    assert torch.allclose(t0, t1)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-7), (before, after)
