#!/usr/bin/env bash
# Kiln's GPU suite, run from a copy of the repository: on the bare GPU machine in one device call (bench/README.md
# gives the call and what it carries), or as a dry run here.
#
#   bash bench/gpu_suite.sh [--only STEP[,STEP]] [--budget SECONDS] [--out DIR]   GPU machine: results under $OUT
#   bash bench/gpu_suite.sh --dry-run [--comfyui TREE[,TREE]] [--out DIR]        here: every step, tiny, on the CPU
#
# On the GPU machine (no network, no ComfyUI) it installs the wheels that bench/gpu_carry.sh packed into
# .gpu-carry/wheels (pip --target, no index) and unpacks the carried ComfyUI trees, both under $KILN_GPU_STAGE
# (default /tmp/kiln-gpu, which a warm machine keeps for the next call), then runs bench/gpu_suite.py with the
# image's python3. The dry run takes the provisioned environment (.kiln/env; KILN_PYTHON / KILN_COMFYUI win).
# Other options pass through to bench/gpu_suite.py (python bench/gpu_suite.py --help).
set -uo pipefail
KILN_SUITE_T0=$(date +%s.%N)  # the set-up below counts against the run's budget
export KILN_SUITE_T0
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$REPO/.gpu-carry
STAGE=${KILN_GPU_STAGE:-/tmp/kiln-gpu}
log() { printf '[gpu suite] %s\n' "$*" >&2; }

dry=0 trees=0
for a in "$@"; do
    case $a in
        --dry-run) dry=1 ;;
        --comfyui | --comfyui=*) trees=1 ;;
    esac
done

if [ "$dry" = 1 ]; then
    env_value() { sed -n "s/^$1=//p" "$REPO/.kiln/env" 2>/dev/null | tail -1; }
    PY=${KILN_PYTHON:-$(env_value KILN_PYTHON)}
    COMFY=${KILN_COMFYUI:-$(env_value KILN_COMFYUI)}
    [ -n "$PY" ] && [ -n "$COMFY" ] || { log "no provisioned ComfyUI: run 'bash scripts/provision.sh' first"; exit 2; }
    [ "$trees" = 1 ] || set -- "$@" --comfyui "$COMFY"
    exec "$PY" "$REPO/bench/gpu_suite.py" "$@"
fi

PY=${KILN_PYTHON:-python3}
mkdir -p "$STAGE"
if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    stamp=$(cd "$CARRY/wheels" && ls -l -- *.whl | sha256sum | cut -c1-16)
    if [ "$(cat "$STAGE/site/.stamp" 2>/dev/null)" != "$stamp" ]; then
        log "installing the carried wheels into $STAGE/site: $(cd "$CARRY/wheels" && echo *.whl)"
        rm -rf "$STAGE/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" \
            "$CARRY"/wheels/*.whl || { log "installing the carried wheels failed"; exit 2; }
        echo "$stamp" > "$STAGE/site/.stamp"
    fi
    export PYTHONPATH="$STAGE/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$trees" = 0 ]; then
    found=""
    for pack in "$CARRY"/comfyui-*.tar.xz; do
        [ -f "$pack" ] || continue
        dest=$STAGE/$(basename "$pack" .tar.xz)
        stamp=$(stat -c '%s-%Y' "$pack")
        if [ "$(cat "$dest/.stamp" 2>/dev/null)" != "$stamp" ]; then
            log "unpacking $(basename "$pack")"
            rm -rf "$dest" "$dest.partial" && mkdir -p "$dest.partial" && tar -C "$dest.partial" -xJf "$pack" \
                && echo "$stamp" > "$dest.partial/.stamp" && mv "$dest.partial" "$dest" || { log "unpacking failed"; exit 2; }
        fi
        found="${found:+$found,}$dest"
    done
    [ -n "$found" ] || { log "no ComfyUI tree: run bench/gpu_carry.sh here and carry .gpu-carry (bench/README.md)"; exit 2; }
    set -- "$@" --comfyui "$found"
fi
exec "$PY" "$REPO/bench/gpu_suite.py" "$@"
