#!/usr/bin/env bash
# Run the whole test suite against the ComfyUI that scripts/provision.sh set up (pytest arguments pass through).
#
#   bash scripts/test.sh                          the pinned ComfyUI 0.3.75 (.kiln/env; what CI runs)
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/test.sh
#                                                 another ComfyUI tree (e.g. 0.33): provisioned first in a venv
#                                                 of its own (idempotent), then the same suite against it
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_FILE="$REPO/.kiln/env"
if [ -n "${COMFYUI_PATH:-}" ]; then
    ENV_FILE="$REPO/.kiln/env-$(basename "$COMFYUI_PATH")-$(printf '%s' "$(cd "$COMFYUI_PATH" && pwd)" | sha256sum | cut -c1-8)"
    KILN_ENV_FILE="$ENV_FILE" bash "$REPO/scripts/provision.sh" >&2
fi
[ -f "$ENV_FILE" ] || { echo "no $ENV_FILE: run 'bash scripts/provision.sh' (or scripts/demo.sh) first" >&2; exit 1; }
set -a; . "$ENV_FILE"; set +a
cd "$REPO"
exec "$KILN_PYTHON" -m pytest -c tests/pytest.ini --rootdir tests "$@"
