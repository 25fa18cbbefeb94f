"""kohya dataset TOML: ``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``, with kohya's precedence
(subset > dataset > general). Unknown keys and wrong types are errors that name the key and its line."""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import fields

from ..errors import KilnError
from .buckets import BucketConfig
from .captions import CaptionOptions
from .dataset import Subset

# key -> expected type(s); the first type names it in error messages
DATASET_KEYS = {
    "resolution": (int, list), "batch_size": (int,), "enable_bucket": (bool,), "min_bucket_reso": (int,),
    "max_bucket_reso": (int,), "bucket_reso_steps": (int,), "bucket_no_upscale": (bool,),
    "validation_split": (float, int), "validation_seed": (int,),
}
SUBSET_KEYS = {
    "image_dir": (str,), "num_repeats": (int,), "caption_extension": (str,), "class_tokens": (str,),
    "is_reg": (bool,), "shuffle_caption": (bool,), "keep_tokens": (int,), "keep_tokens_separator": (str,),
    "caption_prefix": (str,), "caption_suffix": (str,), "caption_dropout_rate": (float, int),
    "caption_tag_dropout_rate": (float, int), "caption_dropout_every_n_epochs": (int,), "flip_aug": (bool,),
    "random_crop": (bool,), "color_aug": (bool,), "conditioning_data_dir": (str,), "alpha_mask": (bool,), "caption_separator": (str,),
    "secondary_separator": (str,),
}
CAPTION_KEYS = [f.name for f in fields(CaptionOptions)]
# (low, high) of numeric keys, both inclusive; None = unbounded
RANGES = {"num_repeats": (1, None), "keep_tokens": (0, None), "caption_dropout_every_n_epochs": (0, None),
          "caption_dropout_rate": (0, 1), "caption_tag_dropout_rate": (0, 1), "batch_size": (1, None),
          "validation_split": (0, 1)}
# Every key above is built or checked. random_crop / color_aug are read into the Subset and refused by
# Cache Latents (kohya refuses them together with latent caching), so the message appears where the conflict is.
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def _line_of(text: str, key: str) -> int | None:
    m = re.search(rf"^\s*{re.escape(key)}\s*=", text, re.M)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _check(table: dict, allowed: dict, where: str, path: str, text: str) -> None:
    for key, value in table.items():
        if key in ("datasets", "subsets") and isinstance(value, list):
            continue
        line = _line_of(text, key)
        at = f"{path}" + (f", line {line}" if line else "") + f" ({where})"
        if key not in allowed and key in DATASET_KEYS:
            raise KilnError(f"'{key}' in {at} is a [[datasets]] key in kohya (it applies to every subset of the "
                            f"block): move it up to its [[datasets]] block or to [general].")
        if key not in allowed:
            raise KilnError(f"unknown key '{key}' in {at}. Known keys here: {', '.join(sorted(allowed))}.")
        types = allowed[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise KilnError(f"'{key}' in {at} must be {TYPE_NAMES[types[0]]}, got {value!r}.")
        low, high = RANGES.get(key, (None, None))
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise KilnError(f"'{key}' in {at} must be {bounds}, got {value!r}.")
        if key == "caption_separator" and not value:
            raise KilnError(f"'{key}' in {at} must not be empty (kohya's default is \",\").")


def _resolution(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise KilnError(f"resolution must be one integer or [width, height], got {value!r}.")
    return value[0], value[1]


def load_dataset_toml(path: str, base_dir: str | None = None) -> tuple[list[Subset], BucketConfig, int]:
    """(subsets, bucket settings of the first [[datasets]] block, batch size) from a kohya dataset config.
    Every subset carries its own block's bucket settings and its caption options. Relative image_dir
    paths are read against ``base_dir`` (default: the TOML's folder)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        cfg = tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        raise KilnError(f"cannot read dataset config {path}: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"dataset config {path} is not valid TOML: {e}") from e
    text = raw.decode("utf-8")
    base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    unknown_top = set(cfg) - {"general", "datasets"}
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise KilnError(f"unknown section or key '{key}' at the top of {path} (line {_line_of(text, key) or '?'}); "
                        f"use [general] and [[datasets]] / [[datasets.subsets]].")
    general = cfg.get("general", {})
    _check(general, {**DATASET_KEYS, **SUBSET_KEYS}, "[general]", path, text)
    datasets = cfg.get("datasets") or []
    if not datasets:
        raise KilnError(f"{path} defines no [[datasets]]; add one with at least one [[datasets.subsets]] image_dir.")
    subsets, blocks = [], []  # blocks: (BucketConfig, batch_size) per [[datasets]]
    for d_index, ds in enumerate(datasets):
        _check(ds, {**DATASET_KEYS, **SUBSET_KEYS}, f"[[datasets]] #{d_index + 1}", path, text)
        merged_ds = {**general, **ds}
        buckets = BucketConfig(_resolution(merged_ds.get("resolution", 512)), merged_ds.get("enable_bucket", False),
                               merged_ds.get("min_bucket_reso", 256), merged_ds.get("max_bucket_reso", 1024),
                               merged_ds.get("bucket_reso_steps", 64), merged_ds.get("bucket_no_upscale", False))
        blocks.append((buckets, merged_ds.get("batch_size", 1)))
        for s_index, sub in enumerate(ds.get("subsets") or []):
            _check(sub, SUBSET_KEYS, f"[[datasets.subsets]] #{s_index + 1} of dataset #{d_index + 1}", path, text)
            m = {k: v for k, v in merged_ds.items() if k in SUBSET_KEYS}
            m.update(sub)
            if "image_dir" not in m:
                raise KilnError(f"subset #{s_index + 1} of dataset #{d_index + 1} in {path} has no image_dir.")
            image_dir = m["image_dir"] if os.path.isabs(m["image_dir"]) else os.path.join(base_dir, m["image_dir"])
            mask_dir = m.get("conditioning_data_dir")
            if mask_dir and not os.path.isabs(mask_dir):
                mask_dir = os.path.join(base_dir, mask_dir)
            mode = "folder" if mask_dir else ("alpha" if m.get("alpha_mask") else "none")
            captions = CaptionOptions(**{k: m[k] for k in CAPTION_KEYS if k in m})
            subsets.append(Subset(image_dir, m.get("num_repeats", 1), m.get("class_tokens", ""),
                                  m.get("caption_extension", ".caption"), m.get("is_reg", False), mode, mask_dir,
                                  captions=captions, buckets=buckets, block=d_index,
                                  batch_size=merged_ds.get("batch_size", 1), flip_aug=m.get("flip_aug", False),
                                  random_crop=m.get("random_crop", False), color_aug=m.get("color_aug", False),
                                  validation_split=merged_ds.get("validation_split"),
                                  validation_seed=merged_ds.get("validation_seed")))
    if not subsets:
        raise KilnError(f"{path} has datasets but no [[datasets.subsets]] with an image_dir.")
    return subsets, blocks[0][0], blocks[0][1]  # each subset also carries its own block's batch_size

