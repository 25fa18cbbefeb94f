#!/usr/bin/env bash
# Run the whole test suite against the ComfyUI that scripts/provision.sh set up.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$REPO/.kiln/env" ] || { echo "no .kiln/env: run 'bash scripts/provision.sh' (or scripts/demo.sh) first" >&2; exit 1; }
set -a; . "$REPO/.kiln/env"; set +a
cd "$REPO"
exec "$KILN_PYTHON" -m pytest -c tests/pytest.ini --rootdir tests "$@"
