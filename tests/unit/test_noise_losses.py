"""kohya's noise, timestep and loss options against values worked out by hand from the published formulas
(kohya-ss/sd-scripts train_util.py / custom_train_functions.py)."""
import math

import torch

from trainer_core.families.sd1 import SD1Objective, zero_terminal_snr
from trainer_core.families.sd3 import SD3Objective
from trainer_core.maths.losses import elementwise, huber_threshold, snr_loss_weight
from trainer_core.training.config import NoiseConfig
from trainer_core.maths.noise import offset_noise, pyramid_noise


def test_pseudo_huber_and_kohyas_smooth_l1():
    pred, target = torch.tensor([[3.0]]), torch.tensor([[0.0]])
    c = torch.tensor([4.0])  # √(3² + 4²) − 4 = 1
    assert elementwise(pred, target, "huber", c).item() == 8.0      # 2c(√(d²+c²) − c)
    assert elementwise(pred, target, "smooth_l1", c).item() == 2.0  # 2(√(d²+c²) − c), not torch's SmoothL1


def test_huber_schedules():
    t = torch.tensor([0, 500, 1000])
    assert torch.allclose(huber_threshold("constant", 0.2, 2.0, t), torch.tensor([0.4, 0.4, 0.4]))
    # e^(−αt)·scale, α = −ln(0.1)/1000: 1 at t=0, √0.1 halfway, c at t = T
    assert torch.allclose(huber_threshold("exponential", 0.1, 1.0, t), torch.tensor([1.0, math.sqrt(0.1), 0.1]))
    acp = torch.tensor([0.25, 0.5])  # σ = √((1−ᾱ)/ᾱ) = √3, 1
    got = huber_threshold("snr", 0.1, 3.0, torch.tensor([0, 1]), 2, acp)  # scale not applied (kohya)
    assert torch.allclose(got, torch.tensor([0.9 / (1 + math.sqrt(3)) ** 2 + 0.1, 0.9 / 4 + 0.1]))


def test_snr_post_weights():
    snr = torch.tensor([3.0])
    assert torch.allclose(snr_loss_weight(snr, True, scale_v_pred_loss_like_noise_pred=True), torch.tensor([0.75]))
    assert torch.allclose(snr_loss_weight(snr, False, v_pred_like_loss=0.5), torch.tensor([1 + 0.5 / 0.75]))
    assert torch.allclose(snr_loss_weight(snr, False, debiased_estimation_loss=True), torch.tensor([1 / math.sqrt(3)]))
    assert torch.allclose(snr_loss_weight(snr, True, debiased_estimation_loss=True), torch.tensor([0.25]))
    assert torch.allclose(snr_loss_weight(torch.tensor([1e6]), False, debiased_estimation_loss=True),
                          torch.tensor([1 / math.sqrt(1000)]))  # SNR capped at 1000


def test_zero_terminal_snr_rescales_sqrt_alphas_cumprod():
    got = zero_terminal_snr(torch.tensor([0.81, 0.25, 0.04], dtype=torch.float64))
    # √ᾱ = .9 .5 .2 -> (x − .2)·.9/.7 = .9, .3857, 0
    assert torch.allclose(got, torch.tensor([0.81, (0.3 * 0.9 / 0.7) ** 2, 0.0], dtype=torch.float64))


def test_offset_and_adaptive_noise():
    x0 = torch.zeros(2, 3, 4, 4)
    x0[:, 1] = -2.0  # channel mean −2: |mean| × 0.5 adds 1.0 to the offset there
    n = torch.randn((2, 3, 1, 1), generator=torch.Generator().manual_seed(7))
    plain = offset_noise(x0, torch.zeros_like(x0), 0.1, None, torch.Generator().manual_seed(7))
    assert torch.allclose(plain, (0.1 * n).expand_as(x0))  # one constant per sample and channel
    adaptive = offset_noise(x0, torch.zeros_like(x0), 0.1, 0.5, torch.Generator().manual_seed(7))
    scale = torch.tensor([0.1, 1.1, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(adaptive, (scale * n).expand_as(x0))


def test_pyramid_noise_is_unit_std_and_adds_coarse_levels():
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pyramid_noise(noise, 6, 0.3, torch.Generator().manual_seed(1))
    assert abs(out.std().item() - 1.0) < 1e-5
    assert not torch.allclose(out, noise / noise.std())
    # one level: r is drawn, then a full-size field weighted discount⁰ = 1 is added
    g = torch.Generator().manual_seed(2)
    one = pyramid_noise(noise, 1, 0.3, torch.Generator().manual_seed(2))
    g.manual_seed(2)
    torch.rand((), generator=g)
    level = torch.randn(1, 4, 16, 16, generator=g)
    assert torch.allclose(one, (noise + level) / (noise + level).std(), atol=1e-6)


def test_input_perturbation_moves_x_t_not_the_target():
    acp = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    x0 = torch.randn(2, 4, 8, 8)
    obj = SD1Objective(acp, "eps", noise=NoiseConfig(ip_noise_gamma=0.5))
    g = torch.Generator().manual_seed(3)
    nb = obj.sample(x0, g)
    g.manual_seed(3)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    extra = torch.randn(x0.shape, generator=g)
    a, s = acp[t].sqrt().float().view(-1, 1, 1, 1), (1 - acp[t]).sqrt().float().view(-1, 1, 1, 1)
    assert torch.equal(nb.target, noise)
    assert torch.allclose(nb.x_t, a * x0 + s * (noise + 0.5 * extra), atol=1e-6)


def test_timestep_range_for_ddpm_and_flow():
    acp = torch.linspace(0.99, 0.01, 1000)
    x0 = torch.zeros(64, 4, 2, 2)
    t = SD1Objective(acp, min_timestep=200, max_timestep=210).sample(x0, torch.Generator().manual_seed(0)).timesteps
    assert t.min() >= 200 and t.max() < 210
    t = SD1Objective(acp, min_timestep=300, max_timestep=300).sample(x0, torch.Generator()).timesteps
    assert (t == 300).all()  # kohya: min == max trains that one timestep
    t = SD3Objective(min_timestep=100, max_timestep=200).sample(x0, torch.Generator().manual_seed(0)).timesteps
    assert t.min() >= 100 and t.max() < 200
