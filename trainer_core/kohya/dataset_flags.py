"""kohya's dataset flags (``train_data_dir``, ``reg_data_dir``, ``resolution``, ``train_batch_size``, the bucket and
caption flags) as the kohya dataset TOML that describes the same dataset, which Load Dataset reads: one reader
(trainer_core/data/toml_config.py) for both.

kohya's rule (config_util.generate_dreambooth_subsets_config_by_subdirs): each sub-folder of ``train_data_dir`` whose
name splits on "_" into a repeat count N >= 1 and a rest is a subset with N repeats and class tokens "rest" (the caption
of its images that have no caption file); ``reg_data_dir``'s are regularization subsets; other folders and loose
images are not read. kohya also uses the flags as fallbacks beneath a ``dataset_config`` (a key the TOML leaves out
takes the flag's value, BlueprintGenerator's last fallback), so with a dataset config the flags go into its
``[general]`` where it has no value of its own.
"""
from __future__ import annotations

import json
import os
import tomllib

from ..errors import KilnError
from ..data.images import is_image_file

# kohya flag -> the dataset TOML key it is the fallback of (kohya's ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME renames two)
DATASET_FLAGS = {
    **{k: k for k in ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                      "bucket_no_upscale", "caption_extension", "shuffle_caption", "keep_tokens",
                      "keep_tokens_separator", "caption_separator", "secondary_separator", "caption_prefix",
                      "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                      "caption_tag_dropout_rate", "flip_aug")},
    "train_batch_size": "batch_size", "caption_extention": "caption_extension",  # the later wins, as in kohya
}
FOLDERS = ("train_data_dir", "reg_data_dir")


def resolution_value(raw, where: str) -> int | list[int]:
    """kohya's --resolution: "512" or "768,512" (width,height); a config file may hold a number or a list too."""
    if isinstance(raw, bool):
        raise KilnError(f"{where}: resolution must be a size such as 512 or 768,512, got {raw!r}.")
    if isinstance(raw, int):
        return raw
    try:
        sizes = [int(v) for v in (raw if isinstance(raw, list) else str(raw).split(","))]
    except ValueError:
        raise KilnError(f"{where}: resolution must be a size such as 512 or 768,512, got {raw!r}.") from None
    if len(sizes) not in (1, 2):
        raise KilnError(f"{where}: resolution must be one size or width,height, got {raw!r}.")
    return sizes[0] if len(sizes) == 1 else sizes


def subdir_subsets(root: str, is_reg: bool, key: str, where: str) -> tuple[list[dict], list[str]]:
    """(the subsets kohya makes of ``root``'s N_name sub-folders, notes on what it does not read), in name order."""
    if not os.path.isdir(root):
        raise KilnError(f"{where}: {key} {root} is not a folder.")
    subsets, ignored = [], []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        head, _, rest = name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            ignored.append(name)
            continue
        if repeats >= 1:
            subsets.append({"image_dir": os.path.abspath(path), "num_repeats": repeats, "class_tokens": rest,
                            "is_reg": is_reg})
    notes = [f"{key}: folder {name!r} has no repeat count (N_name), so kohya does not read it, nor does Kiln"
             for name in ignored]
    loose = sum(1 for n in os.listdir(root) if is_image_file(n) and os.path.isfile(os.path.join(root, n)))
    if loose:
        notes.append(f"{key}: {loose} image(s) directly in {root} are not trained: kohya reads only N_name "
                     f"sub-folders (move them into one, e.g. 10_mychar)")
    return subsets, notes


def flag_values(cfg: dict, where: str) -> dict:
    """The dataset TOML keys the config's dataset flags give; unset ones (None, or "" as kohya_ss writes them) are
    left out."""
    out = {}
    for flag, key in DATASET_FLAGS.items():
        value = cfg.get(flag)
        if value is not None and value != "":
            out[key] = resolution_value(value, where) if key == "resolution" else value
    return out


def dataset_document(cfg: dict, resolve, where: str) -> tuple[dict | None, list[str]]:
    """(the dataset TOML as a dict, notes) that the config's dataset keys describe; None when the config's
    dataset_config is to be read as it is. ``resolve(path)`` makes a config path absolute (kohya: against the
    working directory)."""
    flags = flag_values(cfg, where)
    folders = [k for k in FOLDERS if cfg.get(k)]
    notes: list[str] = []
    if cfg.get("dataset_config"):
        if folders:  # kohya: "ignoring the following options because config file is found"
            notes.append(f"{' and '.join(folders)} ignored: dataset_config is given (as kohya does)")
        if not flags:
            return None, notes
        path = resolve(cfg["dataset_config"])
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            return None, notes  # Load Dataset reads it and names what is wrong
        base = os.path.dirname(os.path.abspath(path))
        for ds in doc.get("datasets", []) if isinstance(doc.get("datasets"), list) else []:
            for sub in ds.get("subsets", []) if isinstance(ds, dict) else []:
                for key in ("image_dir", "conditioning_data_dir"):  # Kiln reads them against the TOML's folder
                    if isinstance(sub, dict) and isinstance(sub.get(key), str) and not os.path.isabs(sub[key]):
                        sub[key] = os.path.join(base, sub[key])
        general = doc.setdefault("general", {})
        used = {k: v for k, v in flags.items() if k not in general}
        general.update(used)
        if used:
            notes.append(f"dataset flags as fallbacks of {cfg['dataset_config']} (kohya's precedence: its own "
                         f"values win): " + ", ".join(f"{k} = {v}" for k, v in used.items()))
        return doc, notes
    if not folders or "train_data_dir" not in folders:
        raise KilnError(f"{where}: no dataset: give dataset_config (a kohya dataset TOML) or train_data_dir (a folder "
                        f"of N_name sub-folders, e.g. 10_mychar), as kohya needs one of them.")
    if "resolution" not in flags:
        raise KilnError(f"{where}: train_data_dir needs resolution (e.g. 512, or 768,512 for width,height), as in "
                        f"kohya, which stops without it.")
    subsets = []
    for key in folders:
        found, more = subdir_subsets(resolve(cfg[key]), key == "reg_data_dir", key, where)
        subsets += found
        notes += more
    if not any(not s["is_reg"] for s in subsets):
        raise KilnError(f"{where}: train_data_dir {cfg['train_data_dir']} has no N_name sub-folders (e.g. "
                        f"10_mychar: 10 repeats, class tokens 'mychar'), the only images kohya trains on.")
    return {"general": flags, "datasets": [{"subsets": subsets}]}, notes


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise KilnError(f"a dataset setting of type {type(value).__name__} cannot be written to a dataset TOML: {value!r}")


def _table(table: dict, indent: str = "") -> list[str]:
    return [f"{indent}{k} = {_value(v)}" for k, v in table.items() if k not in ("datasets", "subsets")]


def toml_text(doc: dict) -> str:
    """A kohya dataset TOML (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``) as text."""
    lines = ["# the dataset kohya builds from these settings, written by Kiln's cli.py", "[general]"]
    lines += _table(doc.get("general", {}))
    for ds in doc.get("datasets", []):
        lines += ["", "[[datasets]]"] + _table(ds)
        for sub in ds.get("subsets", []):
            lines += ["", "  [[datasets.subsets]]"] + _table(sub, "  ")
    return "\n".join(lines) + "\n"
