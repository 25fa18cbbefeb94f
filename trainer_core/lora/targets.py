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


# --- any model: the Linear layers of its repeated blocks ----------------------------------------------------------

# a path segment inside a block that names conditioning, not attention or MLP: adaLN / modulation layers (they map
# the timestep embedding to shift/scale/gate), norms, embedders. Matched per segment, case-insensitive.
NOT_ATTENTION_OR_MLP = r"(?i:[^.]*adaln[^.]*|[^.]*modulation[^.]*|[^.]*_mod|mod|[^.]*norm[^.]*|[^.]*embed[^.]*)"


def repeated_block_lists(root: nn.Module) -> list[str]:
    """Paths of the network's block lists, found from the module tree alone: every ModuleList whose items are all
    of one class and hold Linear layers (a transformer's ``blocks``, Flux's ``double_blocks`` and
    ``single_blocks``, ...), outermost only (a list inside a listed block is part of that block)."""
    found: list[str] = []
    for path, m in root.named_modules():
        if not isinstance(m, nn.ModuleList) or not len(m):
            continue
        if any(path.startswith(f + ".") for f in found):
            continue
        if len({type(b) for b in m}) == 1 and any(isinstance(x, nn.Linear) for x in m[0].modules()):
            found.append(path)
    return found


def block_linear_rules(lists: list[str], rank: int, alpha: float) -> list[TargetRule]:
    """TargetRules for the attention and MLP Linear layers of the blocks in ``lists``: every Linear inside a block
    except those a NOT_ATTENTION_OR_MLP segment names."""
    rules = []
    for path in lists:
        block = rf"{re.escape(path)}\.\d+\." if path else r"\d+\."
        rules.append(TargetRule(rf"{block}(?:.*\.)?{NOT_ATTENTION_OR_MLP}(?:\..*)?", ("linear",), 0, alpha))
        rules.append(TargetRule(rf"{block}.*", ("linear",), rank, alpha))
    return rules
