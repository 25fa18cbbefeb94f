"""A real ComfyUI server as a subprocess on 127.0.0.1, driven through its HTTP API.

Used by the demo (scripts/demo.py), the end-to-end tests (tests/conftest.py) and benchmarks.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class ComfyServerError(Exception):
    """The server rejected a prompt or its execution failed; `.payload` is the server's JSON."""

    def __init__(self, message: str, payload=None):
        super().__init__(message)
        self.payload = payload


class ComfyServer:
    """A `main.py --cpu` subprocess on 127.0.0.1 with its own base directory (models, input, output,
    custom_nodes with only this pack, user) and an in-memory database.

    Attributes: url, port, process, base_dir, models_dir, checkpoints_dir, loras_dir, input_dir,
    output_dir, log_path, start_seconds; Error (= ComfyServerError, for pytest.raises without importing
    conftest, whose module name other conftest.py files share).
    """

    Error = ComfyServerError

    def __init__(self, python: str, comfyui: Path, base: Path | None = None, cpu: bool = True,
                 start_timeout: float = 120.0, log_path: Path | None = None):
        """base=None runs the ComfyUI with its own folders (models/, input/, output/, custom_nodes/)."""
        comfyui = Path(comfyui)
        self.base_dir = Path(base) if base is not None else comfyui
        self.models_dir = self.base_dir / "models"
        self.checkpoints_dir, self.loras_dir = self.models_dir / "checkpoints", self.models_dir / "loras"
        self.input_dir, self.output_dir = self.base_dir / "input", self.base_dir / "output"
        for d in (self.checkpoints_dir, self.loras_dir, self.input_dir, self.output_dir, self.base_dir / "user"):
            d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else self.base_dir / "server.log"
        cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        if base is not None:
            cmd += ["--base-directory", str(base)]
        if cpu:
            cmd.append("--cpu")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self._wait_until_up(started + start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _wait_until_up(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer /system_stats in time:\n{self.log_tail()}")

    def log_text(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def _request(self, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def post(self, path: str, body, timeout: float = 30.0):
        """POST JSON to an endpoint, e.g. post("/settings/Comfy.TutorialCompleted", True)."""
        return self._request(path, body, timeout=timeout)

    def get(self, path: str, timeout: float = 30.0):
        """GET a JSON endpoint, e.g. get("/object_info")."""
        return self._request(path, timeout=timeout)

    def post_prompt(self, workflow: dict, client_id: str | None = None) -> str:
        """Queue an API-format workflow; returns its prompt_id. A rejected prompt raises ComfyServerError
        carrying the server's error JSON (error + node_errors)."""
        body = {"prompt": workflow}
        if client_id:
            body["client_id"] = client_id
        try:
            return self._request("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            raise ComfyServerError(f"/prompt rejected ({e.code}): {json.dumps(payload, indent=1)[:6000]}", payload) from None

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history/<id> until the prompt finishes; returns its history entry (outputs, status, ...).
        An execution error raises ComfyServerError with the error messages."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while time.monotonic() < deadline:
            entry = (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    brief = "\n".join(f"{e.get('node_type')} (node {e.get('node_id')}): {e.get('exception_type')}: "
                                      f"{e.get('exception_message')}\n{''.join(e.get('traceback', []))}" for e in errors)
                    raise ComfyServerError(f"prompt {prompt_id} failed:\n{brief or status}", entry)
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def install(self, src: Path, folder: str = "checkpoints") -> str:
        """Link a model file into the server's models/<folder>; returns the name nodes refer to it by."""
        dest = self.models_dir / folder / Path(src).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            dest.symlink_to(Path(src).resolve())
        return dest.name

    def stop(self) -> None:
        """Terminate the server process group we started (SIGTERM, then SIGKILL after 15 s)."""
        if self.process.poll() is not None:
            return
        import signal
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
