#!/usr/bin/env bash
# Scratch environments for the third-party NIR readers (benchmarks/nir_readers.py,
# benchmarks/nir_sources.py). Idempotent: an environment whose marker file exists is
# left alone; delete /tmp/nirx/<name> to rebuild it.
#
# Each environment is a --target folder with --no-deps packages, layered over the
# project venv (which supplies torch, numpy < 2, h5py, scipy, matplotlib):
#
#     PYTHONPATH=/tmp/nirx/sinabs .venv/bin/python -c "import sinabs"
#
# sinabs 3.1 and rockpool 3.1 pin nir <= 1.0.4, so their folders shadow the venv's
# nir 1.0.8 with nir 1.0.4 and nirtorch 2.0.2 (the newest nirtorch without
# nir >= 1.0.6). snnTorch and spikingjelly use the venv's nir 1.0.8 / nirtorch 2.6.
# Nothing is installed into the project venv. Needs only PyPI.
#
# Usage: bash benchmarks/nir_envs.sh [ROOT]     (ROOT defaults to /tmp/nirx)
set -euo pipefail

ROOT="${1:-/tmp/nirx}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$HERE/.venv/bin/python}"

make_env() {  # make_env NAME PACKAGE...
    local name="$1"; shift
    local dest="$ROOT/$name"
    if [[ -f "$dest/.nirx-done" ]]; then
        echo "nir_envs: $dest exists"
        return 0
    fi
    rm -rf "$dest"
    mkdir -p "$dest"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation --target "$dest" "$@" 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    printf '%s\n' "$@" > "$dest/.nirx-done"
    echo "nir_envs: built $dest ($*)"
}

make_env sinabs sinabs==3.1.3 nir==1.0.4 nirtorch==2.0.2 pbr==7.1.3
make_env rockpool rockpool==3.1.0 nir==1.0.4 nirtorch==2.0.2
make_env snntorch snntorch==1.0.0
make_env spikingjelly spikingjelly==2.0.0 loguru==0.7.3

for name in sinabs rockpool snntorch spikingjelly; do
    PYTHONPATH="$ROOT/$name" "$PY" - "$name" <<'EOF'
import importlib, importlib.metadata as md, sys
name = sys.argv[1]
mod = {"sinabs": "sinabs.nir", "rockpool": "rockpool.nn.modules.torch.nir",
       "snntorch": "snntorch.import_nir",
       "spikingjelly": "spikingjelly.activation_based.nir_exchange"}[name]
importlib.import_module(mod)
print(f"nir_envs: {name} {md.version(name)} nir {md.version('nir')} imports {mod}")
EOF
done
