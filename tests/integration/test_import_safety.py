"""A broken Kiln install is logged by name and leaves ComfyUI's node loading working."""
from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_error_in_kiln_is_logged_not_raised(comfy, tmp_path, caplog):
    pack = tmp_path / "kiln-broken"
    shutil.copytree(REPO, pack, ignore=shutil.ignore_patterns(".git", ".kiln", "tests", "__pycache__"))
    (pack / "nodes" / "train_nodes.py").write_text("raise ImportError('simulated missing dependency')\n")
    before = set(comfy.node_class_mappings())
    with caplog.at_level(logging.INFO):
        ok = asyncio.run(comfy.nodes.load_custom_node(str(pack)))
    assert ok, "ComfyUI treated the pack as failed instead of loading it with no nodes"
    assert "Kiln failed to load" in caplog.text and "simulated missing dependency" in caplog.text
    assert set(comfy.node_class_mappings()) == before  # nothing half-registered
