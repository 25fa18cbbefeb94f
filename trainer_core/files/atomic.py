"""Atomic file writes: a crash, a full disk or a parallel run never leaves a half-written file under a real name.

Temp files are named ``.kiln-<pid>-<random>.tmp`` beside their target, so the leftovers of a process that was
killed mid-write (SIGKILL, power loss) are recognised and removed by the next write into that folder.
Finished files get the permissions a plain ``open()`` would give them (0666 minus the umask), not mkstemp's 0600:
another program or user (A1111, a second ComfyUI) must be able to read a LoRA Kiln wrote.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from typing import Callable

from ..errors import KilnError

_TEMP = re.compile(r"^\.kiln-(\d+)-.*\.tmp$")
_SWEPT: set[str] = set()  # folders already cleared of dead processes' temp files (once per process is enough)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str) -> list[str]:
    """Delete ``.kiln-<pid>-*.tmp`` files in ``folder`` whose writing process no longer runs; returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def free_space(folder: str) -> str:
    """Free space on the filesystem holding ``folder`` (or its nearest existing parent), e.g. '1.2 GiB free'."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"


def _reason(e: BaseException) -> str:
    """What went wrong, in words (safetensors raises its own error type carrying the OS message)."""
    if isinstance(e, OSError):
        if e.errno in (errno.EROFS,):
            return "the folder is on a read-only filesystem"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "no permission to write there"
        return e.strerror or str(e)
    return str(e)


def write_atomically(path: str, write: Callable[[str], None], what: str, remedy: str) -> str:
    """``write(tmp)`` into a temp file beside ``path``, then rename over it; on failure the temp file is removed,
    any earlier file at ``path`` is unchanged, and the KilnError names ``what``, the target, the free space and
    the ``remedy``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        if folder not in _SWEPT:
            remove_stale_temps(folder)
            _SWEPT.add(folder)
        fd, tmp = tempfile.mkstemp(prefix=f".kiln-{os.getpid()}-", suffix=".tmp", dir=folder)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        tmp = None
    except KilnError:
        raise
    except Exception as e:  # OSError, safetensors' SafetensorError, torch.save's RuntimeError: all I/O here
        raise KilnError(f"could not write {what} {path}: {_reason(e)} ({free_space(folder)} on that disk). "
                        f"{remedy}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_writable(folder: str, need_bytes: int, what: str, remedy: str) -> None:
    """Before a long run: ``folder`` can be created and written, and holds ``need_bytes`` free; else a
    KilnError naming ``what`` (the input), the folder, the free space and the ``remedy``."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".kiln-{os.getpid()}-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise KilnError(f"{what}: cannot write into {folder}: {_reason(e)}. {remedy}") from e
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need_bytes:
        raise KilnError(f"{what}: {folder} has {free_space(folder)}, but the files to write need about "
                        f"{need_bytes / 2**20:.1f} MiB. {remedy}")
