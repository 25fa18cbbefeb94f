"""``key=value`` text, the way kohya users write training_args, network_args and optimizer_args: the one parser
every such input goes through."""
from __future__ import annotations

import re

from ..errors import KilnError


def split_pairs(text: str, what: str = "training_args",
                example: str = "'max_train_epochs=10' or 'optimizer_args=[weight_decay=0.1 betas=0.9,0.99]'") -> dict[str, str]:
    """``"a=1 b=[x=1, y=2]\\nc='p q'"`` -> {"a": "1", "b": "[x=1, y=2]", "c": "p q"}: a value runs to the
    next ``key=`` outside brackets and quotes, so lists, ranges and nested arguments keep their commas."""
    inside, depth, quote = [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        inside.append(bool(quote) or depth > 0 or ch in "\"'")
    keys = [m for m in re.finditer(r"(?:^|(?<=[\s,;]))([A-Za-z_][\w.]*)\s*=", text) if not inside[m.start()]]
    stripped = text.strip()
    if stripped and (not keys or text[:keys[0].start()].strip(" \n\t,;")):
        raise KilnError(f"{what}: cannot read {stripped!r}; write key=value pairs, one per line, e.g. {example}.")
    pairs: dict[str, str] = {}
    for m, nxt in zip(keys, keys[1:] + [None]):
        key = m.group(1)
        value = text[m.end():nxt.start() if nxt else len(text)].strip(" \n\t,;")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key in pairs:
            raise KilnError(f"{what}: '{key}' is given twice.")
        pairs[key] = value
    return pairs
