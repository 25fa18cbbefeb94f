"""A kohya command line, pasted as it is after ``cli.py``: ``[accelerate launch ...] sdxl_train_network.py --flag=value
...``. The script names the trainer, as kohya's scripts do; the flags are read as kohya's argparse reads them (``--flag
value`` or ``--flag=value``, switches without a value, lists such as ``--optimizer_args a=1 b=2``, unique prefixes
of a flag) into the keys a ``--config_file`` gives, and ``--config_file`` merges under them as kohya merges it (the
command line wins). config.py then maps those keys: one mapping for files and command lines.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field

from ..errors import KilnError
from ..options.registry import BY_NAME
from .flags import DREAMBOOTH_SCRIPTS, FLAGS, FLOAT_LIST, FLOATS, INTS, SCRIPTS, STEPS, SWITCHES, TEXT_LIST

LAUNCHERS = ("accelerate", "torchrun")
_PYTHON = re.compile(r"^python[0-9.]*(\.exe)?$")


@dataclass
class KohyaCommand:
    script: str                   # e.g. sdxl_train_network.py
    family: str                   # the family the script trains (flags.SCRIPTS)
    keys: dict                    # the flags as config keys, --config_file's keys under them
    launcher: list[str] = field(default_factory=list)  # what came before the script (accelerate launch ...)
    config_file: str | None = None

    @property
    def dreambooth(self) -> bool:
        return self.script in DREAMBOOTH_SCRIPTS


def find_script(argv: list[str]) -> int | None:
    """The position of kohya's script in ``argv`` (by its file name), or None when there is none."""
    for i, token in enumerate(argv):
        if not token.startswith("-") and os.path.basename(token) in SCRIPTS:
            return i
    return None


def split_launcher(before: list[str]) -> tuple[list[str], list[str]]:
    """(cli.py's own options, the launcher) from what precedes the script: the launcher starts at ``accelerate``,
    ``torchrun`` or ``python``."""
    for i, token in enumerate(before):
        if token in LAUNCHERS or _PYTHON.match(os.path.basename(token)):
            return before[:i], before[i:]
    return before, []


def processes_asked(launcher: list[str]) -> int:
    """How many processes the launcher's options ask for (accelerate's --num_processes / --multi_gpu, torchrun's
    --nproc_per_node); 1 when none."""
    n = 1
    for i, token in enumerate(launcher):
        name, eq, value = token.partition("=")
        if name in ("--num_processes", "--nproc_per_node", "--nproc-per-node"):
            value = value if eq else (launcher[i + 1] if i + 1 < len(launcher) else "1")
            n = max(n, int(value) if value.isdigit() else 2)
        elif name == "--multi_gpu":
            n = max(n, 2)
    return n


def kind_of(name: str) -> str:
    """switch, int, float, float_list, text_list, steps or text (kohya's flags); Kiln's own keys by their option's
    kind (a bool one takes an optional true/false)."""
    for kind, names in (("switch", SWITCHES), ("int", INTS), ("float", FLOATS), ("float_list", FLOAT_LIST),
                        ("text_list", TEXT_LIST), ("steps", STEPS)):
        if name in names:
            return kind
    if name in FLAGS:
        return "text"
    option = BY_NAME.get(name)
    kind = option.kind if option else "float" if name.startswith("text_encoder_lr") else "text"
    return {"kwargs": "text_list", "choice": "text", "str": "text"}.get(kind, kind)


def steps_value(raw: str) -> int | float:
    """kohya's int_or_float: "10%" is 0.1, a number below 1 a fraction of all steps, else a step count."""
    if raw.endswith("%"):
        return float(raw[:-1]) / 100.0
    number = float(raw)
    return int(raw) if number >= 1 else number


def typed(flag: str, kind: str, values: list[str], where: str):
    def bad(what: str) -> KilnError:
        return KilnError(f"{where}: --{flag} takes {what}, got {' '.join(values) or 'nothing'}.")

    if kind == "switch":
        if values:
            raise bad("no value (a switch: write --" + flag + " to turn it on, leave it out for off)")
        return True
    if kind in ("text_list", "float_list"):
        try:
            return [float(v) for v in values] if kind == "float_list" else list(values)
        except ValueError:
            raise bad("numbers") from None
    if kind == "bool" and not values:
        return True
    if len(values) != 1:
        raise bad("one value")
    raw = values[0]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "steps":
            return steps_value(raw)
    except ValueError:
        raise bad({"int": "an integer", "float": "a number", "steps": "a step count or a fraction"}[kind]) from None
    if kind == "bool":
        if raw.lower() not in ("true", "false", "1", "0"):
            raise bad("true or false")
        return raw.lower() in ("true", "1")
    return raw


def flag_name(given: str, allowed: frozenset[str] | set[str], script: str) -> str:
    """The flag ``given`` names: itself, or the one flag it is a prefix of (argparse accepts unique prefixes);
    otherwise an error naming kohya's nearest spelling, or the script that has it."""
    if given in allowed:
        return given
    prefixed = sorted(f for f in allowed if f.startswith(given))
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise KilnError(f"{script}: --{given} is ambiguous: it could be {', '.join('--' + f for f in prefixed[:6])}.")
    others = [s for s, (_, flags) in SCRIPTS.items() if given in flags]
    if others:
        raise KilnError(f"{script}: --{given} is not a flag of kohya's {script} (kohya stops with 'unrecognized "
                        f"arguments'); {' and '.join(others)} {'has' if len(others) == 1 else 'have'} it.")
    near = difflib.get_close_matches(given, allowed, n=1, cutoff=0.6)
    hint = f" Did you mean --{near[0]}?" if near else ""
    raise KilnError(f"{script}: --{given} is not a flag of kohya's {script}.{hint} (python {script} --help lists "
                    f"kohya's flags; Kiln reads them all.)")


def read_flags(args: list[str], script: str, allowed: frozenset[str] | set[str]) -> dict:
    """kohya's flags in ``args`` as config keys (last one wins, as in argparse)."""
    out: dict = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise KilnError(f"{script}: {token!r} is not a flag: kohya's scripts take only --name value or "
                            f"--name=value (quote a value with spaces).")
        given, eq, value = token[2:].partition("=")
        name = flag_name(given, allowed, script)
        i += 1
        values = [value] if eq else []
        while not eq and i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        out[name] = typed(name, kind_of(name), values, script)
    return out


def read_command(argv: list[str], read_config, known: set[str]) -> tuple[list[str], KohyaCommand] | None:
    """(cli.py's own options, the command) when ``argv`` holds a kohya script, else None. ``read_config(path)``
    reads a --config_file into keys; ``known`` are the keys Kiln's mapping reads (Kiln's own beyond kohya's flags
    are accepted too: EMA, differential output preservation, text_encoder_lr1/2/3)."""
    at = find_script(argv)
    if at is None:
        return None
    own, launcher = split_launcher(argv[:at])
    script = os.path.basename(argv[at])
    family, flags = SCRIPTS[script]
    allowed = set(flags) | {k for k in known if k not in FLAGS}
    keys = read_flags(argv[at + 1:], script, allowed)
    config_file = keys.pop("config_file", None)
    if config_file:  # kohya: .toml is added when missing; the command line wins over the file
        path = config_file if config_file.endswith(".toml") else config_file + ".toml"
        if not os.path.isfile(path):
            raise KilnError(f"{script}: --config_file {path} not found.")
        keys = {**read_config(path), **keys}
        config_file = path
    return own, KohyaCommand(script, family, keys, launcher, config_file)
