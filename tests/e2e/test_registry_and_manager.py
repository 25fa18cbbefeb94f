"""The pack as the ComfyUI registry and ComfyUI-Manager see it, offline.

A snapshot of this checkout (tracked files plus untracked ones git does not ignore, committed to a throwaway git
repository) goes through the registry's own checks (`comfy node validate`, `comfy node pack`, comfy-cli) and is
installed by ComfyUI-Manager's command-line installer (`cm-cli install`, comfyui-manager) into a fresh ComfyUI
with a fresh Python environment (the provisioned one, hard-linked, so the shared one is never touched), with every
proxy pointed at a closed port: the clone, the requirements and the server start need no network."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from comfy_server import ComfyServer  # noqa: E402  (scripts/ is on sys.path via conftest)

pytestmark = [pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OFFLINE = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                                              "ALL_PROXY")}
OFFLINE.update(no_proxy="", NO_PROXY="")


def run(cmd, cwd, env=None, timeout=300) -> str:
    out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    text = (out.stdout + out.stderr).replace("\r", "\n")
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{text[-6000:]}"
    return text


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """This checkout's files as a one-commit git repository named as users install it."""
    dest = tmp_path_factory.mktemp("src") / "comfyui-kiln"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=kiln-test", "-c", "user.email=test@kiln.invalid"]
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], git + ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def comfy_cli(*args) -> list[str]:
    return [sys.executable, "-m", "comfy_cli", "--skip-prompt", *args]


def test_registry_validation_icon_and_archive(snapshot, tmp_path):
    out = run(comfy_cli("node", "validate"), snapshot, OFFLINE)
    assert "validation checks passed" in out, out
    run(comfy_cli("node", "pack"), snapshot, OFFLINE)
    names = set(zipfile.ZipFile(snapshot / "node.zip").namelist())
    (snapshot / "node.zip").unlink()
    # the archive holds everything ComfyUI loads: the entry point, every module, the frontend, the examples
    needed = {"__init__.py", "pyproject.toml", "requirements.txt", "js/kiln.js", "icon.svg"}
    needed |= {p.relative_to(snapshot).as_posix() for d in ("nodes", "trainer_core", "example_workflows")
               for p in (snapshot / d).rglob("*") if p.is_file()}
    assert not needed - names, sorted(needed - names)
    assert not [n for n in names if n.startswith(".kiln/") or "__pycache__" in n]
    # Icon: the raw URL of icon.svg in the repository named in [project.urls], a small square SVG
    comfy, repo_url = PYPROJECT["tool"]["comfy"], PYPROJECT["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repo_url).group(1)
    assert comfy["Icon"] == f"https://raw.githubusercontent.com/{owner_repo}/main/icon.svg"
    svg = snapshot / "icon.svg"
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("width") == root.get("height")
    assert root.get("viewBox").split()[2] == root.get("viewBox").split()[3] and svg.stat().st_size < 4096
    assert comfy["includes"] == []  # every file the pack needs is tracked by git, so the archive has it already


def fresh_environment(python: str) -> tuple[Path, Path]:
    """(a scratch folder, the python of a venv in it) built from the provisioned Python: its site-packages are hard
    links to the provisioned one's, so the same packages at no copy cost, and an install or removal in it (new
    files, unlinks) never reaches the original. The scratch folder sits beside that site-packages, on its disk."""
    site, base = run([python, "-c", "import site, sys; print(site.getsitepackages()[0]); print(sys._base_executable)"],
                     REPO).split()
    home = Path(tempfile.mkdtemp(prefix="kiln-manager-test-", dir=Path(site).parent))
    venv = home / "venv"
    run([base, "-m", "venv", "--without-pip", str(venv)], home)
    target = next((venv / "lib").glob("python*/site-packages"))
    run(["cp", "-al", f"{site}/.", str(target)], home)
    uv = Path(python).parent / "uv"  # comfyui-manager's uv, found next to the interpreter as in a real venv
    if uv.exists():
        os.link(uv, venv / "bin" / "uv")
    return home, venv / "bin" / "python"


# run in the installed pack's folder with the fresh Python: one step of each LoRA Config algorithm and each
# optimizer whose package a Manager install brings (requirements.txt)
DROPDOWNS_TRAIN = """
import torch
from torch import nn
from trainer_core.lora.config import ALGORITHMS
from trainer_core.lora.network import LoRANetwork
from trainer_core.lora.targets import TargetRule
from trainer_core.maths.optim import OPTIMIZERS, build_optimizer, package_of
algos, opts, skipped = [], [], []
for algorithm in ALGORITHMS:
    root = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8))
    net = LoRANetwork(root, [TargetRule(r".*", ("linear",), 4, 4.0)], lambda p: "lora_" + p, algorithm=algorithm)
    with net.attached():
        root(torch.randn(2, 8)).square().mean().backward()
    assert any(p.grad is not None for p in net.parameters()), algorithm
    algos.append(algorithm)
for name in OPTIMIZERS:
    if package_of(name) == "bitsandbytes":
        skipped.append(name)
        continue
    p = nn.Parameter(torch.randn(4))
    opt = build_optimizer(name, [p], 1e-3)
    getattr(opt, "train", lambda: None)()
    p.square().sum().backward()
    opt.step()
    opts.append(name)
print("trained:", ", ".join(algos), "|", ", ".join(opts), "| skipped (optional):", ", ".join(skipped))
"""


def freeze(python: Path) -> dict[str, str]:
    lines = run([str(python), "-m", "pip", "freeze", "--all"], python.parent).splitlines()
    return {canonicalize_name(re.split(r"[=@ ]", ln)[0]): ln.split("==")[1] for ln in lines if "==" in ln}


@pytest.mark.slow
def test_manager_cli_installs_the_pack_offline_into_a_fresh_comfyui(snapshot, kiln_env):
    home, python = fresh_environment(kiln_env.python)
    server = None
    try:
        comfyui = home / "ComfyUI"
        top = Path(kiln_env.comfyui)
        shutil.copytree(top, comfyui, symlinks=True, ignore=lambda d, names: [  # the code, no models or nodes
            n for n in names if n == "__pycache__" or (Path(d) == top and n in ("user", "output", "temp")) or
            Path(d) == top / "custom_nodes" or Path(d).parent == top / "models"])
        before = freeze(python)
        out = run([str(python), "-m", "cm_cli", "install", f"file://localhost{snapshot}", "--mode", "local",
                   "--exit-on-fail"], home, {**OFFLINE, "COMFYUI_PATH": str(comfyui)})
        assert "[INSTALLED]" in out and "Installation was successful" in out, out
        assert (comfyui / "custom_nodes" / "comfyui-kiln" / "__init__.py").is_file()
        # requirements: Manager runs an install for every line but torch (its blacklist keeps ComfyUI's torch)
        lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
        lines = [ln for ln in lines if ln]  # as the Manager passes them to pip: comments cut, as written
        reqs = [Requirement(ln) for ln in lines]
        for r, line in zip(reqs, lines):
            if r.name == "torch":
                assert f"skip black listed pip installation: '{line}'" in out
            else:
                assert re.search(rf"'install', '{re.escape(line)}'\]", out), (r, out)
        after = freeze(python)
        for r in reqs:
            assert after[canonicalize_name(r.name)] in r.specifier, (r, after[canonicalize_name(r.name)])
        # nothing in ComfyUI's environment downgraded (or removed)
        lower = {k: (v, after.get(k)) for k, v in before.items()
                 if k not in after or Version(after[k]) < Version(v)}
        assert not lower, lower
        # every algorithm and optimizer the dropdowns offer trains in the installed pack, bitsandbytes' ones apart
        # (requirements-optional.txt, documented optional)
        trained = run([str(python), "-c", DROPDOWNS_TRAIN], comfyui / "custom_nodes" / "comfyui-kiln", OFFLINE)
        assert "trained: lora, loha, lokr, dora | AdamW, Lion," in trained and "CAME" in trained, trained
        assert "skipped (optional): AdamW8bit, PagedAdamW8bit, Lion8bit, PagedLion8bit, SGDNesterov8bit" in trained
        # the nodes register: the fresh ComfyUI, started with the fresh Python, serves every node the README lists
        server = ComfyServer(str(python), comfyui, base=None)
        info = server.get("/object_info")
        documented = set(re.findall(r"\(`(Kiln\w+)`\)", (REPO / "README.md").read_text()))
        assert documented and not documented - set(info), sorted(documented - set(info))
        assert "IMPORT FAILED" not in server.log_text()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)
