"""A cheap fingerprint of what a dataset node reads: the name, size, modification time and inode of every file
in its folders. ComfyUI re-runs a node (and everything after it) when its fingerprint changes, so an edited
caption, a replaced image or mask, or an edited TOML trains on the next Queue instead of the cached old data.

Only ``stat`` calls, no file contents: about 11 µs per file, 0.23 s for 10,000 captioned images (see
bench/fingerprint_cost.py). The latent cache still keys entries by content, so a fingerprint that changes
without a real change costs a re-read of the headers, never a re-encode.
"""
from __future__ import annotations

import hashlib
import os


def folders_fingerprint(paths: list[str]) -> str:
    """sha256 over (path, and per entry: name, size, mtime in ns, inode) of each folder or file in ``paths``.
    Folders are listed one level deep (a sub-folder contributes its own stat, not its contents)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"\0{path}\0".encode("utf-8", "surrogateescape"))
        try:
            if os.path.isdir(path):
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
                for e in entries:
                    st = e.stat()
                    h.update(f"{e.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\n".encode("utf-8", "surrogateescape"))
            else:
                st = os.stat(path)
                h.update(f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\n".encode())
        except OSError as e:  # missing or unreadable: the node itself reports it; the fingerprint just differs
            h.update(f"error {e.errno}\n".encode())
    return h.hexdigest()


def subset_folders(subsets) -> list[str]:
    """Every folder the subsets read: images + captions, and mask folders."""
    out: list[str] = []
    for s in subsets:
        for d in (s.image_dir, s.mask_dir):
            if d and d not in out:
                out.append(d)
    return out
