"""Optional confinement of dataset paths, for a ComfyUI that others can reach: dataset folders, TOMLs, mask and
regularization folders, and every file in them (symlinks resolved) must lie inside allowed roots.

Off by default (local use reads any path, as before). On when ``KILN_CONFINE_DATASETS=1``, or when
``KILN_DATASET_ROOTS`` lists extra roots (``os.pathsep``-separated); ComfyUI's input folder is always allowed.
"""
from __future__ import annotations

import os

from ..errors import KilnError

ENV_ON, ENV_ROOTS = "KILN_CONFINE_DATASETS", "KILN_DATASET_ROOTS"


def allowed_roots(input_dir: str, env=os.environ) -> list[str] | None:
    """The real paths data may come from, or None when confinement is off."""
    extra = [r for r in env.get(ENV_ROOTS, "").split(os.pathsep) if r.strip()]
    if env.get(ENV_ON, "").strip().lower() not in ("1", "true", "yes", "on") and not extra:
        return None
    return [os.path.realpath(r) for r in [input_dir] + extra]


def _inside(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, r]) == r for r in roots)


def check_inside(path: str, roots: list[str] | None, what: str) -> None:
    """``path`` (a folder or file, and for a folder every entry in it) resolves inside ``roots``."""
    if roots is None:
        return
    where = ", ".join(roots)
    if not _inside(path, roots):
        raise KilnError(f"{what}: {path} is outside the folders this server allows for datasets ({where}); "
                        f"{ENV_ON} / {ENV_ROOTS} confine them. Put the data in ComfyUI's input folder, or ask the "
                        f"server's owner to add its folder to {ENV_ROOTS}.")
    if os.path.isdir(path):
        with os.scandir(path) as it:
            for e in it:
                if e.is_symlink() and not _inside(e.path, roots):
                    raise KilnError(f"{what}: {e.path} links outside the folders this server allows for datasets "
                                    f"({where}); replace the link with a copy of the file.")
