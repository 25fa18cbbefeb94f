"""Checks a node runs first, on values that may come from the API or a link rather than the frontend's widgets:
combo values against their choices, and names free of control characters."""
from __future__ import annotations

from comfy_api.latest import io

from ..trainer_core.errors import KilnError


def combo_choices(cls) -> dict[str, tuple]:
    """input id -> allowed values, for every Combo input of a V3 node class (not cached: ComfyUI hands each
    execution its own clone of the class)."""
    return {i.id: tuple(i.options) for i in cls.define_schema().inputs if isinstance(i, io.Combo.Input)}


def check_options(cls, node: str, values: dict) -> None:
    """A KilnError naming the input, the value and the choices for the first combo value not among them."""
    for name, choices in combo_choices(cls).items():
        if name in values and values[name] not in choices:
            raise KilnError(f"{node}: {name} {values[name]!r} is not one of its choices: "
                            f"{', '.join(map(str, choices))}.")


def check_text(value: str, node: str, name: str) -> None:
    """Names and paths: no NUL or other control characters (they reach the OS as a raw ValueError otherwise)."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise KilnError(f"{node}: {name} {value!r} contains the control character {bad!r} (code {ord(bad)}); "
                        f"use a plain name such as 'kiln/my_lora'.")
