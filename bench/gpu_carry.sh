#!/usr/bin/env bash
# Make what the GPU suite's device call carries, in .gpu-carry/ (git-ignored): each tested ComfyUI tree without what
# an in-process run never reads, xz-packed, and the wheels the GPU image lacks, then check that the call (working
# tree + .gpu-carry) stays under the device's 64 MiB and print the sizes. bench/README.md gives the device call.
#
#   bash bench/gpu_carry.sh [--comfyui TREE[,TREE]] [--verify]
#
# Trees: by default every ComfyUI this checkout was provisioned against (.kiln/env, and the .kiln/env-* files that
# `COMFYUI_PATH=... bash scripts/test.sh` writes). Wheels: cp312 manylinux x86-64 builds (the GPU image's Python),
# no dependencies (each one needed is listed), at the versions the newest tree's provisioned venv holds, so the GPU
# runs what the tests here run. --verify: unpack each packed tree and run the suite's dry run against it with that
# tree's provisioned Python (proves the trim left nothing out that the steps read).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$REPO/.gpu-carry
LIMIT=$((64 * 1024 * 1024))
log() { printf '[gpu carry] %s\n' "$*" >&2; }

# What the GPU image lacks (its package list: the device's KINDS.md), found by importing ComfyUI with this pack
# and running the suite in a venv without them. 0.3.75: torchsde (+ trampoline) for the samplers, av (comfy_api's
# video types, imported by nodes.py). 0.33 adds comfy_aimdo (comfy.memory_management), comfy_kitchen
# (comfy/ldm/modules/attention.py), sqlalchemy and pydantic (+ its three dependencies; server.py's asset routes).
# comfy-kitchen travels as its pure-Python build (py3-none-any, 0.2 MB; eager/triton backends): the CUDA build is
# 58 MB, more than a call can carry beside av's 36 MB.
WHEELS=(torchsde trampoline av comfy-aimdo sqlalchemy pydantic pydantic-core typing-inspection annotated-types
        typing-extensions)
PURE_WHEELS=(comfy-kitchen)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform any)
# Never read by an in-process run: ComfyUI's own tests, API nodes (init_api_nodes=False), the frontend's subgraph
# blueprints, examples, and the user folders.
EXCLUDES=(--exclude-vcs --exclude=__pycache__ --exclude='*.pyc' --exclude=./tests --exclude=./tests-unit
          --exclude=./comfy_api_nodes --exclude=./blueprints --exclude=./script_examples --exclude='./custom_nodes/*'
          --exclude=./input --exclude=./output --exclude=./temp --exclude=./user --exclude=./models/checkpoints)

trees=() verify=0
while [ $# -gt 0 ]; do
    case $1 in
        --comfyui) IFS=, read -ra trees <<< "$2"; shift ;;
        --comfyui=*) IFS=, read -ra trees <<< "${1#--comfyui=}" ;;
        --verify) verify=1 ;;
        *) echo "usage: bash bench/gpu_carry.sh [--comfyui TREE[,TREE]] [--verify]" >&2; exit 2 ;;
    esac
    shift
done

# tree -> its provisioned Python (from the env file that names it; the first env's Python otherwise)
declare -A PYTHON_OF
discovered=()
for f in "$REPO"/.kiln/env "$REPO"/.kiln/env-*; do
    [ -f "$f" ] || continue
    c=$(sed -n 's/^KILN_COMFYUI=//p' "$f" | tail -1) p=$(sed -n 's/^KILN_PYTHON=//p' "$f" | tail -1)
    [ -n "$c" ] && [ -f "$c/main.py" ] || continue
    c=$(cd "$c" && pwd -P)
    PYTHON_OF[$c]=$p
    discovered+=("$c")
done
[ ${#trees[@]} -gt 0 ] || trees=("${discovered[@]}")
[ ${#trees[@]} -gt 0 ] || { log "no ComfyUI tree: run scripts/provision.sh (and COMFYUI_PATH=... scripts/test.sh)"; exit 2; }

version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py"; }
newest=$(for t in "${trees[@]}"; do printf '%s %s\n' "$(version_of "$t")" "$(cd "$t" && pwd -P)"; done | sort -V | tail -1 | cut -d' ' -f2)
PY=${PYTHON_OF[$newest]:-python3}

rm -rf "$CARRY.partial"
mkdir -p "$CARRY.partial/wheels"
for t in "${trees[@]}"; do
    t=$(cd "$t" && pwd -P) v=$(version_of "$t")
    log "packing ComfyUI $v from $t"
    tar -C "$t" -cf - "${EXCLUDES[@]}" . | xz -T0 -6 > "$CARRY.partial/comfyui-$v.tar.xz"
done

download() {  # NAME, then pip's platform options
    local name=$1 version
    shift
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") \
        || { log "$name is not installed in $PY: provision the newest tree first"; exit 2; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "$@" \
        -d "$CARRY.partial/wheels" "$name==$version" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    compgen -G "$CARRY.partial/wheels/$(echo "$name" | tr - _)-$version-*.whl" >/dev/null \
        || { log "no cp312 x86-64 wheel of $name==$version was downloaded"; exit 2; }
}
for name in "${WHEELS[@]}"; do download "$name" "${PLATFORMS[@]}"; done
for name in "${PURE_WHEELS[@]}"; do download "$name" --platform any; done

commit=$(git -C "$REPO" rev-parse --short HEAD)
rm -rf "$CARRY" && mv "$CARRY.partial" "$CARRY"
# what travels: tracked and untracked-not-ignored files, plus the carry folder
tree_bytes=$(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
python3 - "$CARRY" "$tree_bytes" "$LIMIT" "$commit" <<'PY'
import json, os, sys, time
carry, tree_bytes, limit, commit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
files = {}
for root, _, names in os.walk(carry):
    for n in names:
        p = os.path.join(root, n)
        files[os.path.relpath(p, carry)] = os.path.getsize(p)
total = tree_bytes + sum(files.values())
manifest = {"kiln_commit": commit, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
            "working_tree_bytes": tree_bytes, "call_bytes": total, "limit_bytes": limit}
with open(os.path.join(carry, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
for name, size in sorted(files.items(), key=lambda kv: -kv[1]):
    print(f"{size / 2**20:8.2f} MiB  .gpu-carry/{name}")
print(f"{tree_bytes / 2**20:8.2f} MiB  working tree (tracked + untracked, not ignored)")
print(f"{total / 2**20:8.2f} MiB  one call carries, of {limit / 2**20:.0f} MiB")
sys.exit(0 if total < limit else "over the device's limit: carry less")
PY

if [ "$verify" = 1 ]; then
    for pack in "$CARRY"/comfyui-*.tar.xz; do
        v=$(basename "$pack" .tar.xz) dest=$(mktemp -d)/$(basename "$pack" .tar.xz)
        mkdir -p "$dest" && tar -C "$dest" -xJf "$pack"
        src=""
        for t in "${trees[@]}"; do [ "comfyui-$(version_of "$t")" = "$v" ] && src=$(cd "$t" && pwd -P); done
        log "dry run against the packed $v (Python ${PYTHON_OF[$src]:-python3})"
        KILN_PYTHON=${PYTHON_OF[$src]:-python3} bash "$REPO/bench/gpu_suite.sh" --dry-run --comfyui "$dest" \
            --out "$REPO/.kiln/gpu-carry-verify/$v"
        rm -rf "$(dirname "$dest")"
    done
fi
