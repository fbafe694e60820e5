#!/usr/bin/env bash
# One part of the GPU check (benchmarks/gpu_check.py): tests, step, data, or dali; writes that part's
# files to OUT_DIR as each result exists. Runs from a plain checkout (no pip install of fastafd). On the
# project's GPU machine run it as benchmarks/GPU.md shows: the device call carries .whl/ (made by
# benchmarks/gpu_bundle.sh where pip works) and installs it first; this script installs .whl/ itself
# only when tyro is still missing.
#
#   bash benchmarks/gpu_check.sh PART OUT_DIR [gpu_check.py options, e.g. --cpu-smoke]
set -euo pipefail
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}  # the part's budget counts from here
cd "$(dirname "$0")/.."
part=${1:?usage: bash benchmarks/gpu_check.sh tests|step|data|dali OUT_DIR [options]}
out=${2:?usage: bash benchmarks/gpu_check.sh tests|step|data|dali OUT_DIR [options]}
shift 2
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
if [ "$part" = dali ]; then
    # DALI's wheels travel in parts (.dali1 ... .dali4, one per device call, copied to /tmp/dali by each
    # call: GPU.md); here they are joined, checked and installed
    if compgen -G "/tmp/dali/part.*" >/dev/null && [ -f /tmp/dali/dali.tar.sha256 ]; then
        (cd /tmp/dali && cat part.* >dali.tar && sha256sum -c dali.tar.sha256 && mkdir -p wheels && tar xf dali.tar -C wheels) \
            && "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" /tmp/dali/wheels/*.whl \
            || echo "gpu_check: the DALI parts in /tmp/dali are incomplete or damaged (a call missed, or the machine was released between calls)" >&2
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: no DALI parts in /tmp/dali: the dali part needs the calls of GPU.md that carry .dali1-.dali4, back to back" >&2
    fi
fi
if ! "$py" -c 'import tyro' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# every package the check imports, and typing_extensions new enough for typeguard 4.6 / tyro 1.0 (>= 4.14):
# the bundle carries one, but a PYTHONPATH that puts an older one first would break tyro at import
problem=$("$py" - <<'PY'
import importlib.util
missing = [m for m in ("torch", "torchvision", "timm", "accelerate", "tyro", "tqdm", "safetensors", "numpy", "PIL", "pytest", "pytest_timeout")
           if importlib.util.find_spec(m) is None]
if missing:
    print("missing Python packages: " + " ".join(missing))
else:
    import os
    from importlib.metadata import distributions

    import typing_extensions
    where = os.path.dirname(typing_extensions.__file__)
    found = [d.version for d in distributions(path=[where]) if d.metadata["Name"].lower().replace("-", "_") == "typing_extensions"]
    if found and tuple(int(x) for x in found[0].split(".")[:2]) < (4, 14):
        print(f"typing_extensions {found[0]} (in {where}) is too old for typeguard 4.6.1 / tyro 1.0.17 (they need >= 4.14)")
    else:
        try:
            import tyro  # noqa: F401
        except Exception as e:
            print(f"tyro does not import: {type(e).__name__}: {e}")
PY
) || problem="the package check itself failed (python: $py)"
if [ -n "$problem" ]; then
    echo "gpu_check: $problem; run benchmarks/gpu_bundle.sh where pip works and carry .whl (benchmarks/GPU.md)" >&2
    exit 2
fi
exec "$py" benchmarks/gpu_check.py "$part" --out "$out" "$@"
