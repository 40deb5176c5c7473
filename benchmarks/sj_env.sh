#!/usr/bin/env bash
# Scratch environment for SpikingJelly 2.0.0, the float multi-step IF peer of
# benchmarks/bench_scale.py. Idempotent: a folder whose marker file exists is left
# alone; delete it to rebuild. Nothing is installed into the project venv.
#
# A --target folder of --no-deps packages, layered over the project venv (which
# supplies torch, numpy, tqdm): spikingjelly 2.0.0 imports loguru at start-up
# (spikingjelly/__init__.py), nothing else outside the venv for
# spikingjelly.activation_based.{neuron,layer,functional} on the CPU torch back end.
#
#     bash benchmarks/sj_env.sh [DIR]          (DIR defaults to /tmp/sjenv)
#     .venv/bin/python benchmarks/bench_scale.py --sj-path DIR
set -euo pipefail

DEST="${1:-/tmp/sjenv}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$HERE/.venv/bin/python}"

if [[ -f "$DEST/.sjenv-done" ]]; then
    echo "sj_env: $DEST exists"
else
    rm -rf "$DEST"
    mkdir -p "$DEST"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation --target "$DEST" \
        spikingjelly==2.0.0 loguru==0.7.3 2>&1 | { grep -v "^WARNING: Location" || true; }
    echo "spikingjelly==2.0.0 loguru==0.7.3" > "$DEST/.sjenv-done"
    echo "sj_env: built $DEST"
fi
PYTHONPATH="$DEST" "$PY" - <<'PYEOF'
import importlib.metadata as md
from spikingjelly.activation_based import functional, layer, neuron  # noqa: F401
print(f"sj_env: spikingjelly {md.version('spikingjelly')} imports activation_based "
      "(neuron, layer, functional)")
PYEOF
