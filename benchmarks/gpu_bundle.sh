#!/usr/bin/env bash
# Wheels that the project's GPU machine lacks (it has torch, timm, accelerate, tqdm, safetensors,
# pytest, but not tyro and its two pure-Python dependencies), downloaded into .whl/ (git-ignored)
# for Python 3.12, so that a device call can carry them (about 0.3 MB). benchmarks/gpu_check.sh
# installs them when it finds them.
#
#   bash benchmarks/gpu_bundle.sh            # then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
py=${PYTHON:-python3}
for spec in "tyro==$("$py" -c 'import tyro; print(tyro.__version__)' 2>/dev/null || echo 1.0.17)" docstring-parser typeguard; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$spec"
done
ls -l .whl
