"""kohya's sample prompts (library/train_util.py ``line_to_prompt_dict`` / ``load_prompts``): one prompt per line
with per-line options, or a ``.txt`` / ``.toml`` / ``.json`` prompt file, and kohya's ``sample_sampler`` names.

A line is split at `` --``; the first part is the prompt and each later part an option: ``--n`` negative prompt,
``--w`` / ``--h`` size, ``--d`` seed, ``--s`` steps (1-1000), ``--l`` CFG scale, ``--ss`` sampler. Options kohya
reads for other models (``--g``, ``--cn``, ``--ctr``, ``--rcfg``, ``--fs``) are reported as having no effect here;
anything else is an error (kohya ignores it silently, which hides typos). Option names match case-insensitively,
as in kohya. Options not given fall back to the Train node's widgets (steps, CFG, negative, the
first bucket's size, seed + line number), not kohya's fixed 30 steps / 7.5 / 512² / random seed.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass

from ..errors import KilnError

# kohya's sample_sampler names -> (ComfyUI sampler, scheduler): the closest ComfyUI equivalents of the diffusers
# schedulers kohya's get_my_scheduler builds (the same method, another implementation: images are alike, not equal)
SAMPLERS = {
    "ddim": ("ddim", "ddim_uniform"), "pndm": ("ipndm", "normal"), "lms": ("lms", "normal"),
    "euler": ("euler", "normal"), "euler_a": ("euler_ancestral", "normal"), "heun": ("heun", "normal"),
    "dpm_2": ("dpm_2", "normal"), "dpm_2_a": ("dpm_2_ancestral", "normal"), "dpmsolver": ("dpmpp_2m", "normal"),
    "dpmsolver++": ("dpmpp_2m", "normal"), "dpmsingle": ("dpmpp_2s_ancestral", "normal"), "ddpm": ("ddpm", "normal"),
    "k_lms": ("lms", "normal"), "k_euler": ("euler", "normal"), "k_euler_a": ("euler_ancestral", "normal"),
    "k_dpm_2": ("dpm_2", "normal"), "k_dpm_2_a": ("dpm_2_ancestral", "normal"),
}
NO_EFFECT = {"g": "guidance scale (FLUX)", "cn": "ControlNet image", "ctr": "CFG truncation (Lumina)",
             "rcfg": "renormalised CFG (Lumina)", "fs": "flow shift (FLUX/Lumina)"}
OPTIONS = {"w": ("width", r"(\d+)", int), "h": ("height", r"(\d+)", int), "d": ("seed", r"(\d+)", int),
           "s": ("steps", r"(\d+)", int), "l": ("cfg", r"([\d.]+)", float), "n": ("negative", r"(.+)", str),
           "ss": ("sampler", r"(.+)", str)}
PROMPT_FILES = (".txt", ".toml", ".json")
# kohya's prompt-dict keys (.toml / .json prompt files) -> SamplePrompt fields
DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative", "width": "width", "height": "height", "seed": "seed",
             "sample_steps": "steps", "scale": "cfg", "sample_sampler": "sampler"}


@dataclass
class SamplePrompt:
    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None   # a kohya sample_sampler name


def comfy_sampler(name: str, where: str) -> tuple[str, str]:
    """(ComfyUI sampler, scheduler) for a kohya sample_sampler name."""
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise KilnError(f"{where}: sampler {name!r} is not one of kohya's sample_sampler names "
                        f"({', '.join(SAMPLERS)}).")
    return SAMPLERS[key]


def parse_line(line: str, where: str, notes: list[str]) -> SamplePrompt:
    """One kohya prompt line: ``a cat --n blurry --w 768 --h 512 --d 42 --s 28 --l 7 --ss euler_a``."""
    parts = line.split(" --")
    out = SamplePrompt(parts[0].strip())
    for part in parts[1:]:
        m = re.match(r"([A-Za-z]+)\s*(.*)$", part.strip(), re.S)
        key = m.group(1).lower() if m else part.strip()
        if key in NO_EFFECT:
            notes.append(f"{where}: --{key} ({NO_EFFECT[key]}) has no effect on these previews")
            continue
        if key not in OPTIONS:
            raise KilnError(f"{where}: --{key} is not a kohya sample-prompt option (--n, --w, --h, --d, --s, --l, "
                            f"--ss); a literal ' --' inside a prompt cannot be written.")
        field, pattern, kind = OPTIONS[key]
        value = re.fullmatch(pattern, m.group(2).strip(), re.S)
        try:
            setattr(out, field, kind(value.group(1).strip()))
        except (AttributeError, ValueError):
            raise KilnError(f"{where}: --{key} needs {'a number' if kind is not str else 'a value'}, got "
                            f"{m.group(2).strip()!r}.") from None
    return checked(out, where)


def checked(p: SamplePrompt, where: str) -> SamplePrompt:
    if p.steps is not None:
        p.steps = max(1, min(1000, p.steps))  # kohya clamps --s
    if p.sampler is not None:
        comfy_sampler(p.sampler, where)
    for field in ("width", "height"):
        v = getattr(p, field)
        if v is not None and (v < 8 or v % 8):
            raise KilnError(f"{where}: {field} {v} must be a multiple of 8 (the latent is 1/8 of the image), at "
                            f"least 8.")
    return p


def from_dict(d: dict, where: str) -> SamplePrompt:
    unknown = [k for k in d if k not in DICT_KEYS and k not in ("enum", "subset")]
    if unknown:
        raise KilnError(f"{where}: prompt key {unknown[0]!r} is not read (keys: {', '.join(DICT_KEYS)}).")
    if not isinstance(d.get("prompt"), str):
        raise KilnError(f"{where}: every prompt needs a 'prompt' text.")
    return checked(SamplePrompt(**{DICT_KEYS[k]: v for k, v in d.items() if k in DICT_KEYS}), where)


def load_prompt_file(path: str, notes: list[str]) -> list[SamplePrompt]:
    """kohya's prompt files: .txt (a line each, '#' lines skipped), .toml ([prompt] defaults + [[prompt.subset]]
    entries), .json (a list of lines or of prompt dicts)."""
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise KilnError(f"sample_prompts: cannot read the prompt file {path}: {e.strerror}.") from None
    name = os.path.basename(path)
    if ext == ".txt":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return [parse_line(ln, f"{name} line {i + 1}", notes) for i, ln in enumerate(lines)]
    try:
        data = tomllib.loads(text) if ext == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"sample_prompts: {path} is not valid {ext[1:].upper()}: {e}") from None
    if ext == ".toml":
        table = data.get("prompt", {})
        base = {k: v for k, v in table.items() if k != "subset"}
        entries = [{**base, **sub} for sub in table.get("subset", [])]
    else:
        entries = data if isinstance(data, list) else None
        if entries is None:
            raise KilnError(f"sample_prompts: {path} must hold a JSON list of prompts.")
    return [parse_line(e, f"{name} prompt {i + 1}", notes) if isinstance(e, str) else from_dict(e, f"{name} prompt {i + 1}")
            for i, e in enumerate(entries)]


def is_prompt_file(text: str) -> bool:
    t = text.strip()
    return "\n" not in t and t.lower().endswith(PROMPT_FILES)


def parse_sample_prompts(text: str, notes: list[str]) -> list[SamplePrompt]:
    """The Train node's sample_prompts: lines with kohya's options (a path to a prompt file is read by the caller
    through ``load_prompt_file``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [parse_line(ln, f"sample_prompts line {i + 1}", notes) for i, ln in enumerate(lines)]
