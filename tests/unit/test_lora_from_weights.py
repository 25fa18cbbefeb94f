"""kohya's dim_from_weights: LoRA Config's shape read back from a file of each algorithm."""
import pytest
import torch
from torch import nn

from trainer_core.errors import KilnError
from trainer_core.lora.from_weights import config_from_weights
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule


class Host(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(32, 48)
        self.proj_in = nn.Conv2d(16, 32, 1)
        self.conv1 = nn.Conv2d(16, 24, 3, padding=1)


def network(algorithm, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, **kw):
    rules = [TargetRule(r"to_q|proj_in", ("linear", "conv1x1"), rank, alpha),
             TargetRule(r"conv1", ("conv3x3",), conv_rank, conv_alpha)]
    return LoRANetwork(Host(), rules, lambda p: "lora_unet_" + p, algorithm=algorithm, **kw)


@pytest.mark.parametrize("algorithm, kw", [("lora", {}), ("dora", {}), ("loha", {}), ("lokr", {"factor": 2})])
def test_shape_read_back_and_a_network_of_that_shape_loads_the_file(algorithm, kw):
    if algorithm != "lora":
        pytest.importorskip("lycoris.functional")
    sd = network(algorithm, **kw).kohya_state_dict()
    shape = config_from_weights(sd, "f.safetensors")
    want = {"algorithm": algorithm, "rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}
    if algorithm == "lokr":
        want.update(factor=2, full_matrix=False)
    assert shape == want
    again = network(shape["algorithm"], shape["rank"], shape["alpha"], shape["conv_rank"], shape["conv_alpha"],
                    **{k: shape[k] for k in ("factor", "full_matrix") if k in shape})
    again.load_kohya_state_dict(sd)


def test_per_module_ranks_and_mixed_files_are_refused():
    sd = network("lora").kohya_state_dict()
    sd["lora_unet_proj_in.lora_down.weight"] = torch.zeros(8, 16, 1, 1)
    with pytest.raises(KilnError, match="linear modules have different ranks"):
        config_from_weights(sd, "f")
    with pytest.raises(KilnError, match="no LoRA modules"):
        config_from_weights({}, "f")
