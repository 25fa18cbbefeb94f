"""Atomic file writes: a crash, a full disk or a parallel run never leaves a half-written file under a real name."""
from __future__ import annotations

import os
import tempfile
from typing import Callable

from .errors import KilnError


def write_atomically(path: str, write: Callable[[str], None], what: str, remedy: str) -> str:
    """``write(tmp)`` into a temp file beside ``path``, then rename over it; on failure the temp file is removed,
    any earlier file at ``path`` is unchanged, and the KilnError names ``what`` and the ``remedy``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kiln-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise KilnError(f"could not write {what} {path}: {e.strerror or e}. {remedy}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
