"""Which modules of a network get a LoRA, and with what rank: kohya's selection, as data.

A rule matches modules by dotted path (regex, full match) and by kind; the first matching rule wins,
and a rule with rank 0 excludes what it matches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TargetRule:
    pattern: str          # regex over the module path, e.g. r".*\.attn1\.to_q"
    kinds: tuple          # any of "linear", "conv1x1", "conv3x3"
    rank: int
    alpha: float


def module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv1x1" if tuple(m.kernel_size) == (1, 1) else "conv3x3"
    return None


def select_targets(root: nn.Module, rules: list[TargetRule]) -> list[tuple[str, nn.Module, int, float]]:
    """(path, module, rank, alpha) for every module a rule selects, in module order."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    chosen = []
    for path, m in root.named_modules():
        kind = module_kind(m)
        if kind is None:
            continue
        for rx, rule in compiled:
            if kind in rule.kinds and rx.fullmatch(path):
                if rule.rank > 0:
                    chosen.append((path, m, rule.rank, rule.alpha))
                break
    return chosen
