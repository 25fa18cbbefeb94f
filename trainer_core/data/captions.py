"""Captions: the .txt (or other extension) beside the image, else the folder's class token."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("kiln")


def read_caption(image_path: str, extension: str, fallback: str) -> tuple[str, bool]:
    """(caption, found). A missing caption falls back to the class token, with a warning."""
    ext = extension if extension.startswith(".") else "." + extension
    cap_path = os.path.splitext(image_path)[0] + ext
    if os.path.isfile(cap_path):
        with open(cap_path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        # kohya reads the first line only; multi-line files are usually one caption wrapped
        return " ".join(text.splitlines()[:1]).strip() if text else fallback, True
    log.warning("kiln: no caption %s for %s; using the class token %r", ext, image_path, fallback)
    return fallback, False
