"""Kiln: LoRA training nodes for ComfyUI.

Registers the nodes and the web directory, nothing else. A failure inside Kiln is logged with its
traceback and leaves ComfyUI starting normally (with no Kiln nodes) instead of taking the server down.
"""
import logging

WEB_DIRECTORY = "./js"

try:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI's V3 extension hook)
except Exception:  # pragma: no cover - exercised by tests/integration/test_import_safety.py
    logging.getLogger("kiln").exception(
        "Kiln failed to load; ComfyUI continues without Kiln nodes. "
        "Reinstall the pack's requirements (pip install -r requirements.txt) and report the traceback above."
    )
    NODE_CLASS_MAPPINGS = {}
