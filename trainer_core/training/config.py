"""A run's settings, grouped by what reads them: ``cfg.noise.noise_offset``, ``cfg.optim.optimizer_args``,
``cfg.validation.validation_split``, so noise.py is handed the noise settings and nothing else.

Each group is a dataclass made from the registry: an option's declaration (its ``group``, kind and default) is its
field, so adding an option adds its field here without an edit. The top level holds the options every part reads
(steps, learning_rate, seed, grad_accum, max_train_epochs) and what the host sets that no user writes as an option
(the resolved precision, the batch size, per-group learning rates, ...). The constructor takes every setting by its
flat name (kohya's, unique across groups) and puts it where it belongs; an unknown name is a TypeError, as a
dataclass's would be.
"""
from __future__ import annotations

import copy
from dataclasses import field, fields, make_dataclass

from ..maths.optim import Schedule
from ..options import registry

KIND_TYPES = {"int": "int | None", "float": "float | None", "bool": "bool", "choice": "str | None", "str": "str | None",
              "text": "str", "steps": "float | None", "kwargs": "dict | None"}

# set by the host, not options a user writes (the precision widget's "auto" is resolved to one of these first)
HOST_SETTINGS = {
    "precision": "fp32",                  # autocast dtype: fp32, bf16 or fp16
    "batch_size": 1,                      # from the dataset
    "group_lrs": {},                      # adapter group ("te1", ...) -> its own learning rate
    "save_every": 0,                      # hand a resumable state to on_save every N steps (0: never)
    "stop_text_encoder_training": None,   # kohya (train_db): text encoders train in steps 1..N only
    "preservation_pairs": [],             # (trigger, class), from the dataset (preservation.pairs_from)
    "training_args": {},                  # the training_args given, as parsed (for the node's text)
    "session_id": 0,                      # kohya's ss_session_id / ss_training_started_at
    "training_started_at": 0.0,
}


def _options(group: str) -> list[registry.Option]:
    return list({o.name: o for o in registry.OPTIONS if o.config and o.group == group}.values())


def _group_class(group: str) -> type:
    return make_dataclass(f"{group.title()}Config",
                          [(o.name, KIND_TYPES[o.kind], field(default=o.default)) for o in _options(group)])


GROUPS: dict[str, type] = {g: _group_class(g) for g in sorted({o.group for o in registry.OPTIONS if o.config} - {""})}
TOP_LEVEL: dict[str, object] = {**{o.name: o.default for o in _options("")}, **HOST_SETTINGS}
GROUP_OF: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}
NoiseConfig = GROUPS["noise"]  # what the DDPM objective draws its noise with (noise.py)


class TrainConfig:
    def __init__(self, **settings):
        for name, default in TOP_LEVEL.items():
            setattr(self, name, copy.copy(default))
        for group, cls in GROUPS.items():
            setattr(self, group, cls())
        for name, value in settings.items():
            setattr(self.holder(name), name, value)

    def holder(self, name: str):
        """The object that holds setting ``name``: the config itself or one of its groups."""
        if name in TOP_LEVEL:
            return self
        if name in GROUP_OF:
            return getattr(self, GROUP_OF[name])
        raise TypeError(f"TrainConfig has no setting {name!r}")

    def get(self, name: str):
        """A setting by its flat name, wherever it is grouped (the registry's metadata and resume checks)."""
        return getattr(self.holder(name), name)

    def __repr__(self) -> str:
        top = ", ".join(f"{n}={getattr(self, n)!r}" for n in TOP_LEVEL)
        return f"TrainConfig({top}, " + ", ".join(f"{g}={getattr(self, g)!r}" for g in GROUPS) + ")"

    @property
    def optimizer_name(self) -> str:
        return self.optim.optimizer_type or self.optim.optimizer

    def lr_schedule(self) -> Schedule:
        s = self.schedule
        warmup = s.warmup_steps if s.lr_warmup_steps is None else s.lr_warmup_steps
        return Schedule(s.lr_scheduler, warmup, s.lr_decay_steps, s.lr_scheduler_num_cycles, s.lr_scheduler_power,
                        s.lr_scheduler_min_lr_ratio, s.lr_scheduler_type, s.lr_scheduler_args or {})
