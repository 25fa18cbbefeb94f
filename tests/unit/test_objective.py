import torch

from trainer_core.families.sd1 import SD1Objective


def test_noising_matches_ddpm_formula_and_v_target():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    a = acp[t].sqrt().float().view(-1, 1, 1, 1)
    s = (1 - acp[t]).sqrt().float().view(-1, 1, 1, 1)
    eps = SD1Objective(acp, "eps").at(x0, t, noise)
    assert torch.allclose(eps.x_t, a * x0 + s * noise, atol=1e-6) and torch.equal(eps.target, noise)
    v = SD1Objective(acp, "v").at(x0, t, noise)
    assert torch.allclose(v.target, a * noise - s * x0, atol=1e-6)
    assert torch.allclose(eps.snr.double(), acp[t] / (1 - acp[t]), rtol=1e-5)


def test_min_snr_weights():
    obj = SD1Objective(torch.linspace(0.99, 0.01, 1000), "eps")
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(obj.min_snr_weight(snr, 5.0), torch.tensor([1.0, 1.0, 0.1]))
    v = SD1Objective(torch.linspace(0.99, 0.01, 1000), "v")
    assert torch.allclose(v.min_snr_weight(snr, 5.0), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_sampling_is_seeded():
    obj = SD1Objective(torch.linspace(0.99, 0.01, 1000))
    x0 = torch.randn(2, 4, 8, 8)
    a = obj.sample(x0, torch.Generator().manual_seed(3))
    b = obj.sample(x0, torch.Generator().manual_seed(3))
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.timesteps, b.timesteps)
