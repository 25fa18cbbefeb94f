"""A minimal Chrome DevTools Protocol client for headless Debian chromium (no driver download)."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import aiohttp

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000"]


class Browser:
    """One chromium process with one page; ``evaluate`` runs JS (awaiting promises) and returns JSON values."""

    def __init__(self, port: int):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise RuntimeError("Debian's chromium is not installed: run scripts/provision.sh as root (apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="kiln-chromium-")
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                      f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.port = port
        self.ids = itertools.count(1)
        self.console: list[str] = []

    async def __aenter__(self):
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            await asyncio.sleep(0.2)
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Runtime.enable")
        await self.send("Page.enable")
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.session.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in msg["params"]["args"]))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append("EXCEPTION " + json.dumps(msg["params"]["exceptionDetails"])[:500])
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str):
        res = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {json.dumps(res['exceptionDetails'])[:1500]}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(f"!!({expression})")
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for: {expression}\nconsole: {self.console[-20:]}")
            await asyncio.sleep(interval)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def screenshot(self, path) -> None:
        data = (await self.send("Page.captureScreenshot", format="png"))["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    async def open_app(self, url: str) -> None:
        """ComfyUI's frontend at ``url``, loaded with its extensions (Kiln's among them), and with the workflow it
        opens by itself at start (its default graph) in place, so that a graph loaded next is not replaced by it:
        newer frontends (1.49, ComfyUI 0.33) open that one a while after ``app.graph`` exists."""
        await self.navigate(url)
        await self.wait_for("window.app && window.app.graph && window.app.extensionManager !== undefined", 90)
        try:
            await self.wait_for("app.graph._nodes.length > 0", 20)
        except TimeoutError:
            pass  # a frontend that starts with an empty graph
        # 1.49's splash screen covers the page a while longer: a click before it goes lands on it
        await self.wait_for("!document.getElementById('splash-loader')?.checkVisibility()", 30)

    async def load_graph(self, ui, *args) -> None:
        """``app.loadGraphData(ui, *args)``, checked: the graph then holds exactly ``ui``'s nodes (loaded again if
        the frontend's own start-up workflow replaced it meanwhile)."""
        ui = json.loads(ui) if isinstance(ui, str) else ui
        ids = sorted(str(n["id"]) for n in ui["nodes"])  # newer frontends keep ids as strings
        extra = "".join(f", {json.dumps(a)}" for a in args)
        wanted = json.dumps(json.dumps(ids, separators=(",", ":")))  # as JSON.stringify writes it, as a JS string
        same = f"JSON.stringify(app.graph._nodes.map(n => String(n.id)).sort()) === {wanted}"
        for _ in range(5):
            await self.evaluate(f"app.loadGraphData({json.dumps(ui)}{extra})")
            await asyncio.sleep(0.5)
            if await self.evaluate(same):
                return
        raise RuntimeError(f"the frontend did not keep the loaded graph (nodes {ids}); it shows "
                           f"{await self.evaluate('app.graph._nodes.map(n => n.id)')}")

    async def screenshot_node(self, node_id: int, path, dx: int = 40, dy: int = 60) -> None:
        """A screenshot at scale 1 with node ``node_id`` near the top left (once its image element has loaded)."""
        await self.evaluate(f"(() => {{ app.canvas.ds.scale = 1; const n = app.graph.getNodeById({node_id}); "
                            f"app.canvas.ds.offset = [-n.pos[0] + {dx}, -n.pos[1] + {dy}]; app.canvas.setDirty(true, true); }})()")
        try:  # the frontend may draw the image a moment later; the caller's assertions read the files
            await self.wait_for(f"app.graph.getNodeById({node_id}).imgs?.[0]?.naturalWidth > 0", 20, 0.5)
        except TimeoutError:
            pass
        await asyncio.sleep(1)
        os.makedirs(os.path.dirname(str(path)), exist_ok=True)
        await self.screenshot(path)
