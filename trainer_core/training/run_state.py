"""What a run's state is made of, captured into the dict that ``on_save`` hands out and restored from it, side by
side: a resumed run must continue bit-identically, and ``.kiln-state`` files already written keep their keys."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import distributed
from ..options import registry
from ..maths.ema import EMA
from .epochs import BatchStream
from ..errors import KilnError
from ..maths.optim import FusedBackward

if TYPE_CHECKING:
    from .loop import TrainConfig

# the options the registry marks resumable, and the text encoders' learning rates (set from the te-lr widgets)
RESUMABLE_SETTINGS = registry.resumable() + ("group_lrs",)


def run_settings(cfg: TrainConfig) -> dict:
    """The settings a saved state records; on resume they may differ (and then take effect), except the
    optimizer, whose saved state only fits the optimizer that wrote it."""
    return {"optimizer": cfg.optimizer_name, **{k: cfg.get(k) for k in RESUMABLE_SETTINGS}}


def changed_settings(saved: dict | None, cfg: TrainConfig) -> list[str]:
    """'learning_rate 0.002 → 1e-05', ... for every setting that differs from the saved run's; refuses a
    different optimizer."""
    if not saved:
        return []
    now = run_settings(cfg)
    if saved.get("optimizer", now["optimizer"]) != now["optimizer"]:
        raise KilnError(f"the state to resume was written by optimizer {saved['optimizer']}, and its moments do not "
                        f"fit {now['optimizer']}: set optimizer back to {saved['optimizer']}, or rename the "
                        f".kiln-state file away to continue from the LoRA's weights with a fresh optimizer.")
    return [f"{k} {saved[k]!r} → {now[k]!r}" for k in RESUMABLE_SETTINGS if k in saved and saved[k] != now[k]]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the node's text, e.g. settings a resume changed
    steps: int = 0
    seconds: float = 0.0
    probe_loss_start: float = float("nan")
    probe_loss_end: float = float("nan")
    validation: list = field(default_factory=list)  # (step, validation loss)
    lrs: list = field(default_factory=list)         # (step, learning rate of the first group), for the loss plot
    saves: list = field(default_factory=list)       # steps after which on_save wrote an intermediate save

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)


@dataclass
class RunState:
    """Everything a step advances. Each random stream is its own, so that one option (caption augmentation,
    flips) never moves another's draws (batch order, noise); the torch RNG (dropout) is saved with them."""
    cfg: TrainConfig
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    fused: FusedBackward | None        # fused_backward_pass: per-parameter optimizers that step during backward
    scaler: torch.amp.GradScaler | None
    ema: EMA | None
    requested_lrs: dict[str, float]    # each group's learning rate as asked, before the schedule scaled it
    world: int
    batches: BatchStream
    gen: torch.Generator               # timesteps and noise
    caption_rng: random.Random
    flip_rng: random.Random
    result: TrainResult = field(default_factory=TrainResult)

    @classmethod
    def start(cls, cfg: TrainConfig, cache, params: list, opt, sched, fused, scaler, ema, requested_lrs: dict,
              world: int) -> RunState:
        """Step 0 of a run: every stream seeded from ``cfg.seed``."""
        return cls(cfg, params, opt, sched, fused, scaler, ema, requested_lrs, world,
                   batches=BatchStream(cache, cfg.batch_size, cfg.seed), gen=torch.Generator().manual_seed(cfg.seed),
                   caption_rng=random.Random(cfg.seed + 2), flip_rng=random.Random(cfg.seed + 3))

    @property
    def total_batch(self) -> int:
        """kohya's total batch size."""
        return self.cfg.batch_size * self.world * self.cfg.grad_accum

    @property
    def stepping(self) -> list:
        """The optimizers that step the weights (each parameter's own under fused_backward_pass)."""
        return self.fused.children if self.fused else [self.opt]

    def capture(self, step: int) -> dict:
        """The state after ``step``, every tensor a copy (the run goes on while the host writes it)."""
        return {"step": step, "optimizer": (self.fused or self.opt).state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(), "caption_rng": self.caption_rng.getstate(),
                "flip_rng": self.flip_rng.getstate(), "batches": self.batches.state(),
                "losses": list(self.result.losses), "probe_loss_start": self.result.probe_loss_start,
                "settings": run_settings(self.cfg), "validation": [list(v) for v in self.result.validation],
                "lrs": [list(v) for v in self.result.lrs], "saves": list(self.result.saves),
                "world_size": self.world, "total_batch": self.total_batch,
                "ema": self.ema.state_dict() if self.ema else None,
                # with EMA the saved file holds the average: the trained values go on from here
                "trained": [p.detach().to("cpu", copy=True) for p in self.params] if self.ema else None}

    def restore(self, state: dict) -> None:
        """Continue from a captured ``state`` (the trained weights already loaded from the file saved with it).
        Settings changed since are taken up and listed in the result's notes."""
        cfg, step = self.cfg, state["step"]
        if step >= cfg.steps:
            raise KilnError(f"the run to resume already made {step} steps; set steps above that to train on.")
        changed = changed_settings(state.get("settings"), cfg)
        saved_world = state.get("world_size", 1)
        if saved_world != self.world:
            changed.append(f"processes {saved_world} → {self.world} (total batch {state.get('total_batch', '?')} → "
                           f"{self.total_batch}; the current epoch's batches are drawn again for it)")
        (self.fused or self.opt).load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.rebase_learning_rates()
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        distributed.split_torch_rng()
        self.caption_rng.setstate(state["caption_rng"])
        self.flip_rng.setstate(state["flip_rng"])
        self.batches.restore(state["batches"])
        if state.get("trained") is not None:
            with torch.no_grad():
                for p, saved in zip(self.params, state["trained"]):
                    p.copy_(saved)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.result = TrainResult(losses=list(state["losses"]), steps=step, probe_loss_start=state["probe_loss_start"],
                                  validation=[tuple(v) for v in state.get("validation", [])],
                                  lrs=[tuple(v) for v in state.get("lrs", [])], saves=list(state.get("saves", [])))
        first = step + 1
        if changed:
            self.result.notes.append(f"resumed at step {step}, changed since the saved run: {', '.join(changed)}; "
                                     f"they take effect from step {first}, so this is no longer exactly the run "
                                     f"that stopped")
        else:
            self.result.notes.append(f"resuming exactly at step {step}")
        if self.ema is not None and state.get("ema") is None:
            self.result.notes.append(f"the saved run had no EMA: the average starts at step {first} from its weights")

    def rebase_learning_rates(self) -> None:
        """A loaded schedule brings the saved run's learning rates back: the requested ones (and schedule) take
        effect. Named (LambdaLR) schedules only: a class-path one has no factor to recompute the rates from, and
        Adafactor's reads the optimizer's own."""
        sched, opt = self.sched, self.opt
        if hasattr(sched, "lr_lambdas") and type(sched).__name__ != "AdafactorSchedule":
            sched.base_lrs = [self.requested_lrs.get(g.get("name"), self.cfg.learning_rate) for g in opt.param_groups]
            for k, (g, base) in enumerate(zip(opt.param_groups, sched.base_lrs)):
                g["initial_lr"], g["lr"] = base, base * sched.lr_lambdas[k](sched.last_epoch)
            sched._last_lr = [g["lr"] for g in opt.param_groups]
