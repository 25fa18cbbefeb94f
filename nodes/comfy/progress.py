"""Progress bar and preview image in the graph, Cancel checks, and custom events for the frontend
(docs/architecture.md, fact 8)."""
from __future__ import annotations

from PIL import Image

import comfy.model_management
import comfy.utils


class Progress:
    """Progress bar + preview image in the graph, Cancel checks, and loss events for the frontend."""

    def __init__(self, total: int, node_id: str | None = None):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total
        self.node_id = node_id

    def update(self, value: int, preview: Image.Image | None = None, total: int | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if total is not None:
            self.total = total
        # ComfyUI scales a preview to fit max_size, up as well as down: a 64 px sample stays 64 px (and says so)
        size = min(512, max(preview.size)) if preview is not None else None
        self.bar.update_absolute(value, self.total, ("JPEG", preview, size) if preview is not None else None)

    def text(self, message: str) -> None:
        """A line of text under the running node (ComfyUI's progress text), e.g. an ETA."""
        server = self._server()
        if server is not None and hasattr(server, "send_progress_text") and self.node_id is not None:
            server.send_progress_text(message, self.node_id, server.client_id)

    @staticmethod
    def _server():
        try:
            from server import PromptServer
        except ImportError:
            return None
        return getattr(PromptServer, "instance", None)

    def send(self, event: str, data: dict) -> None:
        server = self._server()
        if server is not None:
            server.send_sync(event, {"node": self.node_id, **data}, server.client_id)
