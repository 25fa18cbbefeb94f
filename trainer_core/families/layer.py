"""The family layer: what Kiln knows about each model family, as data plus a little code.

A ``Family`` says how ComfyUI names it (its ``model_config`` classes), which parameterisations ComfyUI's model
sampling may report for it, what its network is conditioned with (the ``extra_conds`` it reads), its kohya names,
the blocks gradient checkpointing and block swap work on, and how its objective is made. The node side reads
ComfyUI's ``model_sampling`` into a ``Sampling`` (plain tensors and a callable: nodes/comfy/model.py) and hands it
here, so the training target is the one the model is sampled with, and nothing in trainer_core imports ComfyUI.

Adding a family: an entry in FAMILIES (and a module beside this one for what is its own: draws, target rules,
names), a Train node that fills a FamilyPlan from it (docs/development.md, "Adding a model family").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import KilnError
from . import flux, sd1, sd3
from .flow import per_mille


@dataclass(frozen=True)
class Sampling:
    """What ComfyUI's ``model_sampling`` says about a model, as plain data."""
    prediction: str                      # "eps" / "v" (DDPM, a discrete σ table) or "flow" (ComfyUI's CONST)
    sigmas: torch.Tensor | None = None   # DDPM: ComfyUI's σ_t = √((1 − ᾱ_t)/ᾱ_t), one per timestep
    multiplier: float = 1000.0           # flow: the network's timestep is σ·multiplier (SD3 1000, FLUX.1 1)
    shift: float = 1.0                   # flow: the shift ComfyUI samples with (informational)
    timestep: Callable | None = None     # flow: ComfyUI's own model_sampling.timestep(σ), when the node has it

    def alphas_cumprod(self) -> torch.Tensor:
        return 1.0 / (1.0 + self.sigmas.double().cpu() ** 2)

    def network_timestep(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.timestep is not None:
            return self.timestep
        return per_mille if self.multiplier == 1000.0 else (lambda s, m=self.multiplier: s * m)


@dataclass(frozen=True)
class Family:
    key: str                             # the registry's family / node kind ("sd1", "flux", ...)
    node: str                            # its Train node's display name
    model_configs: tuple                 # ComfyUI model_config class names it trains
    predictions: tuple                   # parameterisations ComfyUI may report for it
    conditioning: tuple                  # what its network's forward takes beside x_t and t (extra_conds keys)
    objective: Callable                  # (Sampling, TrainConfig, node options) -> the loop's Objective
    te_prefixes: dict = field(default_factory=dict)  # text encoder -> kohya prefix
    network_module: str = "networks.lora"            # ss_network_module
    inplace_residuals: bool = False      # its blocks add residuals in place: LayerNorms need an input copy (backward)
    defaults: dict = field(default_factory=dict)     # known-good option values where kohya's differ per family


def ddpm_objective(sampling: Sampling, cfg, opts: dict) -> sd1.SD1Objective:
    """SD1/SD2/SDXL: the model's own discrete schedule, ε or v as ComfyUI samples it, kohya's noise options."""
    noise = cfg.noise
    return sd1.SD1Objective(sampling.alphas_cumprod(), sampling.prediction, noise.min_timestep, noise.max_timestep,
                            noise, noise.zero_terminal_snr)


def sd3_objective(sampling: Sampling, cfg, opts: dict) -> sd3.SD3Objective:
    noise = cfg.noise
    return sd3.SD3Objective(opts["weighting_scheme"], opts["logit_mean"], opts["logit_std"], opts["mode_scale"],
                            opts["training_shift"], noise.min_timestep or 0,
                            1000 if noise.max_timestep is None else noise.max_timestep, sampling.network_timestep())


def flux_objective(sampling: Sampling, cfg, opts: dict):
    return flux.objective(opts, sampling.network_timestep())


def any_objective(sampling: Sampling, cfg, opts: dict):
    """Train LoRA (any model): the objective the model's own sampling implies. DDPM (eps/v): the SD1 objective on
    its σ table; flow (ComfyUI's CONST): velocity ε − x0 as for Flux, σ drawn by kohya's timestep_sampling with
    ``discrete_flow_shift`` 0 meaning the shift ComfyUI samples the model with."""
    if sampling.prediction == "flow":
        shift = opts["discrete_flow_shift"] or sampling.shift
        return flux.objective({**opts, "discrete_flow_shift": shift}, sampling.network_timestep())
    return ddpm_objective(sampling, cfg, opts)


FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("sd1", "Train LoRA (SD1)",
           ("SD15", "SD15_instructpix2pix", "SD20", "SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler", "LotusD"),
           ("eps", "v"), ("context",), ddpm_objective, {"clip_l": "lora_te", "clip_h": "lora_te"}),
    Family("sdxl", "Train LoRA (SDXL)",
           ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B", "SDXL_instructpix2pix"),
           ("eps", "v"), ("context", "y"), ddpm_objective, {"clip_l": "lora_te1", "clip_g": "lora_te2"}),
    Family("sd3", "Train LoRA (SD3)", ("SD3",), ("flow",), ("context", "y"), sd3_objective, sd3.TE_PREFIXES,
           "networks.lora_sd3", defaults={"huber_schedule": "constant"}),  # kohya's snr schedule needs DDPM
    Family("flux", "Train LoRA (Flux)", ("Flux", "FluxSchnell", "Chroma"), ("flow",), ("context", "y", "guidance"),
           flux_objective, flux.TE_PREFIXES, "networks.lora_flux", inplace_residuals=True,
           defaults={"huber_schedule": "constant"}),
    # no preset: whatever model ComfyUI loaded, conditioned through its own extra_conds (nodes/comfy/text.py)
    Family("any", "Train LoRA (any model)", (), ("eps", "v", "flow"), ("context", "extra_conds"), any_objective,
           network_module="networks.lora"),
)}
NODE_FOR_MODEL_CONFIG = {c: f.node for f in FAMILIES.values() for c in f.model_configs}


def objective(family: Family, sampling: Sampling, cfg, opts: dict):
    """The family's objective on the model's own parameterisation; a parameterisation the family is not trained
    with is refused (e.g. a ModelSamplingDiscrete patch set to lcm in front of an SD1 model)."""
    if sampling.prediction not in family.predictions:
        raise KilnError(f"{family.node}: this model samples as {sampling.prediction}; {family.node} trains "
                        f"{' or '.join(family.predictions)} models. Remove the sampling patch before the Train node.")
    return family.objective(sampling, cfg, opts)
