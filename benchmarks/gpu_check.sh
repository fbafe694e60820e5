#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py): CUDA tests, step throughput, GPU decode; writes
# gpu_check.json/.md and gpu-tests.xml to OUT_DIR. Runs from a plain checkout (no pip install of
# fastafd needed). On a machine without internet, first run benchmarks/gpu_bundle.sh on a machine
# with one and bring the .whl/ folder along: it is installed into /tmp/fastafd-site here.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [options]}
shift
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastafd-site .whl/*.whl
    export PYTHONPATH=/tmp/fastafd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
missing=$("$py" - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "timm", "accelerate", "tyro", "tqdm", "safetensors", "numpy", "PIL", "pytest") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing; run benchmarks/gpu_bundle.sh where pip works and bring .whl/ along" >&2
    exit 2
fi
exec "$py" benchmarks/gpu_check.py --out "$out" "$@"
