"""Differential output preservation: prior preservation without regularization images.

For each training caption that holds the trigger word, the caption with the trigger replaced by its class word
(``sks dog`` → ``dog``) is the preservation prompt. On the step's own noisy latents and timesteps, the trained
network's prediction for that prompt is pulled toward the base network's prediction for it: the same network
with its adapters switched off, in the same step, so no second model copy exists. The loss gains
``multiplier × mean((pred − base)²)`` in the model's output space. kohya's ``diff_output_preservation`` is the
same idea applied to a whole subset (a subset with that custom attribute trains toward the adapter-free
prediction instead of its images); Kiln follows ai-toolkit's form of it (an extra term on every training
caption's class prompt, with its trigger → class replacement), which needs no extra images.

The trigger → class pairs come from the dataset, the kohya way (an ``N_name`` folder names the class, the
subset's ``class_tokens`` is the trigger), or are given as ``diff_output_preservation_trigger`` / ``_class``.
"""
from __future__ import annotations

import os
import re

from ..errors import KilnError

FOLDER = re.compile(r"^\d+_(.+)$")


def pairs_from(subsets, trigger: str = "", cls: str = "") -> list[tuple[str, str]]:
    """(trigger, class) pairs: the explicit ones, else one per training subset whose class_tokens differ from
    its folder's class name. ``subsets``: the dataset's Subset records."""
    trigger, cls = trigger.strip(), cls.strip()
    if trigger or cls:
        if not (trigger and cls):
            raise KilnError("diff_output_preservation_trigger and diff_output_preservation_class go together: "
                            "give both (e.g. trigger 'sks dog', class 'dog').")
        return [(trigger, cls)]
    pairs = []
    for s in subsets:
        m = FOLDER.match(os.path.basename(s.image_dir.rstrip("/\\")))
        if s.is_reg or not m:
            continue
        folder_class, tokens = m.group(1).strip(), (s.class_tokens or "").strip()
        if tokens and folder_class and tokens != folder_class and (tokens, folder_class) not in pairs:
            pairs.append((tokens, folder_class))
    if not pairs:
        raise KilnError("diff_output_preservation needs to know the trigger word and its class: name the image "
                        "folder after the class (e.g. '10_dog') and set class_tokens to the trigger (e.g. "
                        "'sks dog'), or give diff_output_preservation_trigger and diff_output_preservation_class.")
    return pairs


def preservation_caption(caption: str, pairs: list[tuple[str, str]]) -> str | None:
    """The caption with every trigger replaced by its class (whole words), or None when it holds no trigger."""
    out = caption
    for trigger, cls in pairs:
        out = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", cls, out)
    return None if out == caption else out
