"""Captions: the .txt (or other extension) beside the image, else the folder's class token; and kohya's
caption augmentation, applied each time a sample is drawn (so a caption can differ every step).

Augmentation follows kohya-ss/sd-scripts ``BaseDataset.process_caption``:

1. ``caption_prefix`` / ``caption_suffix`` are joined to the caption with a space, *before* anything else,
   so they take part in tag splitting (a prefix ending in "," is a tag of its own; with ``keep_tokens`` or
   ``keep_tokens_separator`` it can be the kept part, which is how kohya users pin a trigger word).
2. Whole-caption dropout: with probability ``caption_dropout_rate``, and on every epoch divisible by
   ``caption_dropout_every_n_epochs`` (epochs count from 1), the caption becomes "" (prefix included).
3. Tags are split on ``caption_separator``. With ``keep_tokens_separator`` in the caption, the part before
   it stays fixed and in place, and the part after a *second* separator is a fixed suffix; otherwise the
   first ``keep_tokens`` tags are fixed. Only the tags in between are shuffled (``shuffle_caption``) and
   dropped one by one (``caption_tag_dropout_rate``). The result is joined with ", ".
4. ``secondary_separator`` is replaced by ``caption_separator`` last, so "a;;;b" stays one tag in
   step 3 and reads "a,b" afterwards.

One deliberate difference: kohya splits on the keep separator only when shuffling or tag dropout is on,
so with both off the literal separator (e.g. "|||") reaches the text encoder. Kiln always removes it.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace

log = logging.getLogger("kiln")


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption augmentation, with kohya's key names and defaults (all off)."""
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str = ""
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """True when the same caption can come out differently from one draw (or epoch) to the next."""
        return bool(self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0
                    or self.caption_tag_dropout_rate > 0)

    def describe(self) -> str:
        """A short human-readable list of what is switched on ('' when nothing is)."""
        parts = []
        if self.caption_prefix:
            parts.append(f"prefix {self.caption_prefix!r}")
        if self.caption_suffix:
            parts.append(f"suffix {self.caption_suffix!r}")
        if self.shuffle_caption:
            parts.append("shuffle")
        if self.keep_tokens_separator:
            parts.append(f"keep before {self.keep_tokens_separator!r}")
        elif self.keep_tokens:
            parts.append(f"keep first {self.keep_tokens}")
        if self.caption_dropout_rate:
            parts.append(f"caption dropout {self.caption_dropout_rate:g}")
        if self.caption_dropout_every_n_epochs:
            parts.append(f"no caption every {self.caption_dropout_every_n_epochs} epochs")
        if self.caption_tag_dropout_rate:
            parts.append(f"tag dropout {self.caption_tag_dropout_rate:g}")
        return ", ".join(parts)


def _tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def augment_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int = 1) -> str:
    """The caption as trained for one draw of a sample in ``epoch`` (1-based); see the module docstring.
    All randomness comes from ``rng``, so a fixed seed gives the same captions in the same order."""
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    if dropped or (opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0):
        return ""
    sep, keep_sep = opts.caption_separator, opts.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed, flex = caption.split(keep_sep, 1)
        flex, _, suffix = flex.partition(keep_sep)
        fixed, flex, suffix = _tags(fixed, sep), _tags(flex, sep), _tags(suffix, sep)
    elif opts.shuffle_caption or opts.caption_tag_dropout_rate > 0:
        tags = _tags(caption, sep)
        fixed, flex, suffix = tags[:opts.keep_tokens], tags[opts.keep_tokens:], []
    else:
        fixed, flex, suffix = None, None, None  # nothing to split: the text stays exactly as written
    if flex is not None:
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, sep)
    return caption


def base_caption(caption: str, opts: CaptionOptions) -> str:
    """The caption with prefix, suffix and separators applied and nothing random: what a subset without
    shuffle/dropout always trains on (encoded once before training), and the default sample prompt."""
    steady = replace(opts, shuffle_caption=False, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                     caption_tag_dropout_rate=0.0)
    return augment_caption(caption, steady, random.Random(0))


def decode_text(raw: bytes, path: str) -> str:
    """A caption file's text: UTF-8 (a BOM, UTF-8's or UTF-16's, is honoured), else cp1252, else latin-1,
    with a warning naming the file whenever it was not UTF-8, so no caption trains with replacement characters."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encodings = ("utf-16",)
    else:
        encodings = ("utf-8-sig", "cp1252", "latin-1")
    for enc in encodings:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        if enc not in ("utf-8-sig",):
            log.warning("kiln: caption %s is not UTF-8; read it as %s. Save it as UTF-8 to be sure of its "
                        "characters.", path, enc)
        return text
    return raw.decode("latin-1")  # unreachable for the 8-bit codecs; keeps the type checker honest


def read_caption(image_path: str, extension: str, fallback: str) -> tuple[str, bool]:
    """(caption, found). A missing or empty caption falls back to the class token, with a warning."""
    ext = extension if extension.startswith(".") else "." + extension
    cap_path = os.path.splitext(image_path)[0] + ext
    if os.path.isfile(cap_path):
        with open(cap_path, "rb") as f:
            text = decode_text(f.read(), cap_path).strip()
        if not text:
            log.warning("kiln: caption %s is empty; using the class token %r", cap_path, fallback)
            return fallback, True
        # kohya reads the first line only; multi-line files are usually one caption wrapped
        return " ".join(text.splitlines()[:1]).strip(), True
    log.warning("kiln: no caption %s for %s; using the class token %r", ext, image_path, fallback)
    return fallback, False
