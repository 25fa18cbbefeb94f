"""kohya's scale_weight_norms: after every step each LoRA module's change up·down·α/r is scaled back to the limit
when its norm is above it (half the factor on up, half on down), modules under it are left bit for bit, and networks
without up/down pairs are refused before the first step."""
import pytest
import torch
from torch import nn

from test_loop_options import run
from trainer_core.errors import KilnError
from trainer_core.training.full import FullNetwork
from trainer_core.lora import max_norm
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.training.loop import TrainConfig

FAST = dict(steps=3, batch_size=2, learning_rate=0.5, optimizer="SGD", max_grad_norm=0.0)


def network(algorithm="lora"):
    root = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    return LoRANetwork(root, [TargetRule(r".*", ("linear",), 4, 2.0)], lambda p: "lora_" + p.replace(".", "_"),
                       algorithm=algorithm)


def delta_norms(net) -> list[float]:
    return [float(a.low_rank_weight().detach().norm()) for a in net.adapters.values()]


def test_a_module_over_the_limit_is_scaled_back_to_it_and_one_under_it_is_left_alone():
    net = network()
    big, small = net.adapters.values()
    with torch.no_grad():
        big.lora_up.weight.normal_(0, 3.0)
        small.lora_up.weight.normal_(0, 1e-3)
    up_before, down_before = small.lora_up.weight.clone(), small.lora_down.weight.clone()
    direction = big.low_rank_weight() / big.low_rank_weight().norm()
    assert delta_norms(net)[0] > 1.0 > delta_norms(net)[1]
    small_norm = delta_norms(net)[1]
    scaled, mean, largest = max_norm.apply(net, 1.0)
    assert scaled == 1
    assert delta_norms(net)[0] == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(big.low_rank_weight(), direction, atol=1e-6)  # the same direction, only shorter
    assert torch.equal(small.lora_up.weight, up_before) and torch.equal(small.lora_down.weight, down_before)
    assert largest == pytest.approx(1.0, rel=1e-5) and mean == pytest.approx((1.0 + small_norm) / 2, rel=1e-5)


def test_training_with_the_limit_keeps_every_module_within_it():
    free_delta, _ = run(TrainConfig(**FAST))
    _, limited = run(TrainConfig(**FAST, scale_weight_norms=0.05))
    norm = lambda sd, k: float((sd[f"{k}.lora_up.weight"].flatten(1) @ sd[f"{k}.lora_down.weight"].flatten(1)).norm()
                               * sd[f"{k}.alpha"] / sd[f"{k}.lora_down.weight"].shape[0])  # noqa: E731
    modules = {k.rsplit(".", 2)[0] for k in limited if k.endswith("lora_up.weight")}
    assert max(norm(limited, k) for k in modules) <= 0.05 * (1 + 1e-5)
    _, free = run(TrainConfig(**FAST))
    assert max(norm(free, k) for k in modules) > 0.05  # without it the same run goes past the limit
    assert any(d.abs().sum() > 0 for d in free_delta.values())


def test_networks_without_up_and_down_pairs_are_refused_before_training():
    with pytest.raises(KilnError, match="full fine-tune \\(DreamBooth\\) has none"):
        max_norm.check(FullNetwork(), 1.0)
    with pytest.raises(KilnError, match="loha adapters have none"):
        max_norm.check(network("loha"), 1.0)
    max_norm.check(network("dora"), 1.0)
