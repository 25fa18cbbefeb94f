"""LoHa / LoKr / DoRA adapters: each delta weight rebuilt from the saved file with the published formula
(written out here, independently of lycoris.functional) equals what the trained module really does."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

pytest.importorskip("lycoris.functional")

from trainer_core.errors import KilnError
from trainer_core.lora.config import LoraConfig
from trainer_core.lora.io import load_lora_file, save_lora_file
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule

CASES = [("loha", {}), ("lokr", {"factor": 4}), ("lokr", {"factor": -1, "full_matrix": True}),
         ("lokr", {"factor": 8}), ("dora", {}), ("lora", {})]


class Host(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 48)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.pw = nn.Conv2d(16, 32, 1)


def names(path):
    return "lora_unet_" + path.replace(".", "_")


def trained_network(algorithm, seed=0, **kw):
    torch.manual_seed(seed)
    host = Host()
    rules = [TargetRule(r"lin|pw", ("linear", "conv1x1"), 4, 2.0), TargetRule(r"conv", ("conv3x3",), 2, 1.0)]
    net = LoRANetwork(host, rules, names, seed=seed, algorithm=algorithm, **kw)
    with torch.no_grad():  # as after training: every factor non-zero (the zero-initialised halves included)
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return host, net


def kron_formula(sd, n):
    """LyCORIS / ComfyUI LoKr: kron(w1, w2) with w2 = w2_a·w2_b and scale alpha/rank, or w2 full and scale 1."""
    w1 = sd[f"{n}.lokr_w1"]
    if f"{n}.lokr_w2" in sd:
        w2, scale = sd[f"{n}.lokr_w2"], 1.0
    else:
        w2, scale = sd[f"{n}.lokr_w2_a"] @ sd[f"{n}.lokr_w2_b"], float(sd[f"{n}.alpha"]) / sd[f"{n}.lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    a, c = w1.shape[:2]
    b, d = w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:])
    for i in range(a):  # the Kronecker product written out block by block
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
    return out * scale


def weight_from_file(sd, n, w):
    """The weight a LyCORIS loader ends up with for module ``n`` whose base weight is ``w``."""
    alpha = float(sd[f"{n}.alpha"])
    if f"{n}.hada_w1_a" in sd:
        r = sd[f"{n}.hada_w1_b"].shape[0]
        d = (sd[f"{n}.hada_w1_a"] @ sd[f"{n}.hada_w1_b"]) * (sd[f"{n}.hada_w2_a"] @ sd[f"{n}.hada_w2_b"]) * alpha / r
        return w + d.reshape(w.shape)
    if f"{n}.lokr_w1" in sd:
        return w + kron_formula(sd, n).reshape(w.shape)
    down, up = sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"]
    d = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha / down.shape[0]
    if f"{n}.dora_scale" not in sd:
        return w + d
    v = w + d  # DoRA: each input column of W + ΔW rescaled to the trained magnitude
    norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (v.dim() - 2))
    return v * sd[f"{n}.dora_scale"] / norm


@pytest.mark.parametrize("algorithm,kw", CASES)
def test_file_rebuilds_the_trained_modules_effective_weight(tmp_path, algorithm, kw):
    host, net = trained_network(algorithm, **kw)
    path = str(tmp_path / "x.safetensors")
    save_lora_file(path, net.kohya_state_dict(), {})
    sd, _ = load_lora_file(path)
    inputs = {"lin": torch.randn(3, 5, 32), "conv": torch.randn(2, 16, 6, 6), "pw": torch.randn(2, 16, 5, 5)}
    for path_, x in inputs.items():
        base = getattr(host, path_)
        n = names(path_)
        w = weight_from_file(sd, n, base.weight.detach())
        want = F.linear(x, w, base.bias) if path_ == "lin" else F.conv2d(x, w, base.bias, padding=base.padding)
        with net.attached(), torch.no_grad():
            got = base(x)  # the module as it trains: its own forward (LoKr's bypass, DoRA's input scaling)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (algorithm, path_)
        assert not torch.allclose(got, base(x), atol=1e-4)  # the adapter does change the output
        assert torch.allclose(net.adapters[n].delta_weight().detach(), w - base.weight.detach(), atol=1e-5)


def test_lyCORIS_key_names_and_shapes():
    _, net = trained_network("loha")
    sd = net.kohya_state_dict()
    assert set(k.split(".", 1)[1] for k in sd) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert sd["lora_unet_conv.hada_w1_b"].shape == (2, 16 * 9) and sd["lora_unet_conv.hada_w1_a"].shape == (24, 2)
    _, net = trained_network("lokr", factor=8)
    sd = net.kohya_state_dict()
    # 48 = 6·8 and 32 = 4·8: w1 (6, 4); rank 4 ≥ max(8, 8) / 2, so w2 is full (LyCORIS's rule) and alpha = rank
    assert sd["lora_unet_lin.lokr_w1"].shape == (6, 4) and sd["lora_unet_lin.lokr_w2"].shape == (8, 8)
    assert float(sd["lora_unet_lin.alpha"]) == 4
    _, net = trained_network("lokr", factor=2)
    sd = net.kohya_state_dict()
    # 48 = 2·24, 32 = 2·16: rank 4 < 12 -> w2 low rank, flattened over the kernel for the 3x3 conv (24 = 2·12, 16 = 2·8)
    assert sd["lora_unet_lin.lokr_w2_a"].shape == (24, 4) and sd["lora_unet_lin.lokr_w2_b"].shape == (4, 16)
    assert sd["lora_unet_conv.lokr_w2_a"].shape == (12, 2) and sd["lora_unet_conv.lokr_w2_b"].shape == (2, 8 * 9)
    _, net = trained_network("dora")
    sd = net.kohya_state_dict()
    assert sd["lora_unet_lin.dora_scale"].shape == (1, 32) and sd["lora_unet_conv.dora_scale"].shape == (1, 16, 1, 1)


@pytest.mark.parametrize("algorithm,kw", CASES)
def test_fresh_adapters_leave_the_base_output_unchanged(algorithm, kw):
    torch.manual_seed(0)
    host = Host()
    x = torch.randn(2, 32)
    ref = host.lin(x)
    net = LoRANetwork(host, [TargetRule("lin", ("linear",), 4, 4.0)], names, algorithm=algorithm, **kw)
    with net.attached():
        assert torch.allclose(host.lin(x), ref, atol=1e-6)
    assert torch.equal(host.lin(x), ref)


def test_matches_lycoris_modules_own_maths():
    """Cross-check against the package's module classes (not only its functional ops)."""
    import lycoris
    _, net = trained_network("lokr", factor=2)
    a = net.adapters["lora_unet_lin"]
    ref = lycoris.LokrModule("x", a.base, lora_dim=4, alpha=2.0, factor=2)
    with torch.no_grad():
        ref.lokr_w1.copy_(a.lokr_w1)
        ref.lokr_w2_a.copy_(a.lokr_w2_a)
        ref.lokr_w2_b.copy_(a.lokr_w2_b)
    # get_weight includes alpha/rank (4.1.3 get_diff_weight multiplies by the scale a second time)
    assert torch.allclose(ref.get_weight(None), a.delta_weight(), atol=1e-6)
    h = lycoris.LohaModule("y", a.base, lora_dim=4, alpha=2.0)
    _, loha = trained_network("loha")
    b = loha.adapters["lora_unet_lin"]
    with torch.no_grad():
        for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            getattr(h, k).copy_(getattr(b, k))
    assert torch.allclose(h.get_weight(None), b.delta_weight(), atol=1e-6)


def test_resume_refuses_another_algorithm_or_rank():
    _, net = trained_network("loha")
    sd = net.kohya_state_dict()
    _, other = trained_network("lokr", factor=2)
    with pytest.raises(KeyError, match="algorithm 'loha' in the file, this run uses 'lokr'"):
        other.load_kohya_state_dict(sd)
    _, same = trained_network("loha", seed=1)
    same.load_kohya_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
    torch.manual_seed(0)
    bigger = LoRANetwork(Host(), [TargetRule(r"lin|pw", ("linear", "conv1x1"), 8, 2.0),
                                  TargetRule(r"conv", ("conv3x3",), 2, 1.0)], names, algorithm="loha")
    before = {k: v.clone() for k, v in bigger.kohya_state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_unet_lin: the file has rank 4 .*loha adapter rank 8"):
        bigger.load_kohya_state_dict(sd)
    assert all(torch.equal(v, bigger.kohya_state_dict()[k]) for k, v in before.items())  # nothing half loaded


def test_config_checks_and_metadata():
    with pytest.raises(KilnError, match="rank_dropout"):
        LoraConfig(algorithm="loha", rank_dropout=0.1).check()
    with pytest.raises(KilnError, match="LoKr only"):
        LoraConfig(algorithm="loha", factor=4).check()
    cfg = LoraConfig(rank=8, conv_rank=4, conv_alpha=2, algorithm="lokr", factor=8, full_matrix=True).check()
    assert cfg.network_module == "lycoris.kohya"
    assert cfg.network_args() == {"algo": "lokr", "conv_dim": "4", "conv_alpha": "2", "factor": "8",
                                  "full_matrix": "True"}
    assert LoraConfig(algorithm="dora").network_args() == {"algo": "locon", "dora_wd": "True", "wd_on_output": "False"}
    assert LoraConfig().network_module == "networks.lora" and LoraConfig().network_args() == {}


def test_missing_package_names_the_pip_line(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_lycoris(name, *a, **k):
        if name == "lycoris" or name.startswith("lycoris."):
            raise ImportError("No module named 'lycoris'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_lycoris)
    with pytest.raises(KilnError, match=r'pip install "lycoris-lora>=4.1,<5"'):
        LoraConfig(algorithm="lokr").check()
    LoraConfig(algorithm="lora").check()  # plain LoRA never needs it
