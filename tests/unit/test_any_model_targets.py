"""Train LoRA (any model)'s targets from the module tree alone (trainer_core/lora/targets.py): the repeated block
lists, their attention and MLP Linears (not modulation, norms or embedders), and adapters named by ComfyUI's dotted
module paths (trainer_core/lora/network.py) that save, load and count like kohya-named ones."""
import torch
from torch import nn

from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import block_linear_rules, repeated_block_lists, select_targets


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.norm_q = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(8, 48))
        self.img_mod = nn.Linear(8, 16)
        self.experts = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])  # a list inside a block: part of it


class TinyDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.single = nn.ModuleList([Block()])
        self.heads = nn.ModuleList([nn.Linear(8, 8), nn.Conv2d(8, 8, 1)])  # mixed classes: not a block list
        self.final = nn.Linear(8, 8)

    def forward(self, x):
        for b in list(self.blocks) + list(self.single):
            x = x + b.mlp(b.attn.proj(x)) + b.experts[0](x)
        return self.final(x)


def test_block_lists_are_found_from_the_module_tree():
    assert repeated_block_lists(TinyDiT()) == ["blocks", "single"]


def test_attention_and_mlp_linears_of_each_block_are_targeted_nothing_else():
    net = TinyDiT()
    chosen = [p for p, *_ in select_targets(net, block_linear_rules(repeated_block_lists(net), 4, 2.0))]
    per_block = ["attn.qkv", "attn.proj", "mlp.0", "mlp.2", "experts.0", "experts.1"]
    assert chosen == [f"blocks.{i}.{s}" for i in range(2) for s in per_block] + [f"single.0.{s}" for s in per_block]


def test_comfyui_module_names_save_and_load_and_train():
    torch.manual_seed(0)
    net = TinyDiT()
    rules = block_linear_rules(repeated_block_lists(net), 4, 2.0)
    lora = LoRANetwork(net, rules, lambda path: f"diffusion_model.{path}", seed=1)
    assert "diffusion_model.blocks.0.attn.qkv" in lora.adapters and len(lora) == 18
    assert list(lora.adapters)[0] == "diffusion_model.blocks.0.attn.qkv"
    sd = lora.kohya_state_dict()
    assert {"diffusion_model.blocks.1.mlp.2.lora_up.weight", "diffusion_model.blocks.1.mlp.2.lora_down.weight",
            "diffusion_model.blocks.1.mlp.2.alpha"} <= set(sd)
    x = torch.randn(3, 8)
    with lora.attached():
        base = net(x)
        for a in lora.adapters.values():
            nn.init.normal_(a.lora_up.weight)
        assert not torch.allclose(net(x), base)
        again = LoRANetwork(net, rules, lambda path: f"diffusion_model.{path}", seed=2)
    again.load_kohya_state_dict(lora.kohya_state_dict())
    assert all(torch.equal(again.kohya_state_dict()[k], v) for k, v in lora.kohya_state_dict().items())


FLOW_OPTS = dict(timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=0.0, model_prediction_type="raw",
                 weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)


def test_any_objective_follows_the_models_own_sampling():
    from trainer_core.families import flux, layer, sd1
    from trainer_core.training.config import TrainConfig
    fam, cfg = layer.FAMILIES["any"], TrainConfig()
    sigmas = torch.linspace(0.03, 14.6, 1000, dtype=torch.float64)
    assert isinstance(layer.objective(fam, layer.Sampling("eps", sigmas=sigmas), cfg, FLOW_OPTS), sd1.SD1Objective)
    # flow: the velocity target; discrete_flow_shift 0 = the shift ComfyUI samples the model with
    flow = layer.objective(fam, layer.Sampling("flow", multiplier=1.0, shift=3.0), cfg, FLOW_OPTS)
    shifted = flux.objective(FLOW_OPTS | dict(discrete_flow_shift=3.0), lambda s: s)
    x0 = torch.randn(64, 4, 8, 8)
    a, b = flow.sample(x0, torch.Generator().manual_seed(0)), shifted.sample(x0, torch.Generator().manual_seed(0))
    assert flow.target == "velocity" and torch.equal(a.timesteps, b.timesteps) and torch.equal(a.target, b.target)
    assert torch.allclose(a.timesteps.float(), a.sigma.view(-1).float())  # FLUX.1-like multiplier 1: t = σ
    unshifted = layer.objective(fam, layer.Sampling("flow", shift=3.0), cfg, FLOW_OPTS | dict(discrete_flow_shift=1.0))
    assert unshifted.sample(x0, torch.Generator().manual_seed(0)).sigma.mean() < a.sigma.mean()
