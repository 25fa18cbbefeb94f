#!/usr/bin/env bash
# README command (a): provision a pinned ComfyUI + this pack (or use COMFYUI_PATH), then train the demo
# LoRA through a real headless ComfyUI server's HTTP API.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/provision.sh"
set -a; . "$REPO/.kiln/env"; set +a
exec "$KILN_PYTHON" "$REPO/scripts/demo.py" "$@"
