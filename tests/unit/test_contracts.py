"""The loop's contracts (trainer_core/training/contracts.py): every network and objective it is given has each member it
uses, LoRA adapters say they can be switched off and full weights that they cannot, and SD3 refuses min-SNR in
words instead of failing on a missing method."""
import inspect

import pytest
import torch
from torch import nn

from trainer_core.training.contracts import Objective, SwitchableNetwork, TrainableNetwork
from trainer_core.errors import KilnError
from trainer_core.families.sd1 import SD1Objective
from trainer_core.families.sd3 import SD3Objective
from trainer_core.training.full import FullNetwork
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule


def members(protocol) -> set[str]:
    own = set()
    for cls in protocol.__mro__:
        if cls not in (object,) and getattr(cls, "_is_protocol", False):
            own |= {k for k in vars(cls) if not k.startswith("_")} | set(getattr(cls, "__annotations__", {}))
    return own


def lora() -> LoRANetwork:
    return LoRANetwork(nn.Sequential(nn.Conv2d(4, 4, 1)), [TargetRule(r".*", ("conv1x1",), 2, 2.0)], lambda p: p)


def full() -> FullNetwork:
    net = FullNetwork()
    net.add(nn.Conv2d(4, 4, 1), "unet")
    return net


@pytest.mark.parametrize("make", [lora, full])
def test_both_networks_have_every_member_of_the_trainable_contract(make):
    net = make()
    missing = [m for m in members(TrainableNetwork) if not hasattr(net, m)]
    assert not missing, missing
    assert isinstance(net.switchable, bool)


def test_only_adapters_can_be_switched_off():
    assert lora().switchable and not full().switchable
    assert not [m for m in members(SwitchableNetwork) if not hasattr(lora(), m)]
    assert not hasattr(full(), "set_enabled")


@pytest.mark.parametrize("objective", [SD1Objective(torch.linspace(0.99, 0.01, 100)), SD3Objective()])
def test_both_objectives_have_every_member_of_the_objective_contract(objective):
    missing = [m for m in members(Objective) if not hasattr(objective, m)]
    assert not missing, missing
    for name in members(Objective) - {"num_timesteps"}:
        ours = inspect.signature(getattr(Objective, name)).parameters
        theirs = inspect.signature(getattr(type(objective), name)).parameters
        assert list(theirs)[:len(ours)] == list(ours), name


def test_sd3_has_no_post_weights_and_refuses_min_snr():
    sd3, sd1 = SD3Objective(), SD1Objective(torch.linspace(0.99, 0.01, 100))
    snr = torch.tensor([0.5, 2.0])
    assert sd3.loss_weight(snr, None) is None and sd3.num_timesteps == 1000
    with pytest.raises(KilnError, match=r"min_snr_gamma does not apply to flow-matching models \(SD3"):
        sd3.min_snr_weight(snr, 5.0)

    class Plain:  # kohya's post-processing options, all off
        scale_v_pred_loss_like_noise_pred, v_pred_like_loss, debiased_estimation_loss = False, None, False
    assert torch.equal(sd1.loss_weight(snr, Plain()), torch.ones(2))
