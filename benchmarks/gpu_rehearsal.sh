#!/usr/bin/env bash
# A rehearsal of the GPU check's device calls (benchmarks/GPU.md) on a CPU machine with pip: what can
# go wrong there without a GPU (a missing package, a wheel that does not install, a file the command
# does not find, results outside the limits on what comes back) goes wrong here first.
#
# 1. A fresh virtual environment in /tmp made like the GPU machine's (KINDS.md): only packages it
#    lists, at its versions where known (torch 2.11.0, torchvision 0.26.0, accelerate 1.15.0,
#    safetensors 0.8.0) and typing_extensions 4.12.2 (older than tyro needs: the bundle must bring
#    its own); no tyro, no DALI, no fastafd install.
# 2. A copy of what the device tool would send: tracked + untracked-not-ignored files + each call's
#    carried paths (.whl/ from benchmarks/gpu_bundle.sh, made first if missing).
# 3. Calls 1-3 of GPU.md run word for word with " --cpu-smoke" appended, python3 being the new
#    environment's, pip without this machine's configuration (the GPU machine has no registry), each
#    call into its own empty $OUT, which must then hold the part's files within the limits on what
#    comes back (8 files, 16 MiB each, two folders deep, plain names).
#
#   bash benchmarks/gpu_rehearsal.sh          # exit 0: all three would run; 3: the registry cannot be reached
# Environment: PYTHON (the interpreter for the venv, default python3), REHEARSAL_VENV (default
# /tmp/fastafd-gpu-rehearsal-venv, made anew each run; REHEARSAL_REUSE=1 keeps one that exists, for
# quick reruns while editing, which is then no longer a fresh environment).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
venv=${REHEARSAL_VENV:-/tmp/fastafd-gpu-rehearsal-venv}
work=$(mktemp -d /tmp/fastafd-gpu-rehearsal.XXXXXX)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
say() { echo "gpu_rehearsal: $*"; }
mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }

# -- the environment --------------------------------------------------------------------------------------
if ! "$py" -m pip download -q --no-deps -d "$work/probe" typing-extensions==4.12.2 >/dev/null 2>&1; then
    say "cannot reach the package registry (pip download typing-extensions failed): nothing rehearsed" >&2
    exit 3
fi
[ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null || bash benchmarks/gpu_bundle.sh
if [ "${REHEARSAL_REUSE:-0}" = 1 ] && "$venv/bin/python" -c 'import torch; assert torch.__version__.startswith("2.11.0")' 2>/dev/null; then
    say "reusing $venv (REHEARSAL_REUSE=1: not a fresh environment)"
else
    rm -rf "$venv"
    "$py" -m venv "$venv"
    say "installing torch 2.11.0, torchvision 0.26.0 and the GPU machine's other packages into $venv"
fi
if [ ! -f "$venv/.rehearsal-installed" ] && ! "$venv/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 accelerate==1.15.0 safetensors==0.8.0 timm tensorboard \
        pytest pytest-timeout numpy pillow tqdm pyyaml psutil packaging typing-extensions==4.12.2 >"$work/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$work/pip.log" | tail -20 >&2
    say "the environment could not be installed" >&2
    exit 1
fi
touch "$venv/.rehearsal-installed"
if "$venv/bin/python" -c 'import tyro' 2>/dev/null; then
    say "tyro is importable in the fresh environment: it would not be like the GPU machine" >&2
    exit 1
fi
say "environment ready after $(( $(date +%s) - start )) s: $("$venv/bin/python" -c 'import sys, torch, torchvision, timm, accelerate; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}")')"

# -- the calls --------------------------------------------------------------------------------------------
"$venv/bin/python" benchmarks/gpu_check.py calls >"$work/calls.json"
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
declare -A expect=(
    [tests]="env.json tests.jsonl tests.log tests.md"
    [step]="step.md step-cifar_resnet8_cifar_resnet8-reference.json step-cifar_resnet8_cifar_resnet8-afd-sequential.json step-cifar_resnet8_cifar_resnet8-independent.json"
    [data]="env.json data-decode.json comm-smoke-eager-fp32.json data.md"
)
summary=()
failed=0
for n in 1 2 3; do
    part=$("$venv/bin/python" -c "import json, sys; print(json.load(open(sys.argv[1]))[$n - 1]['part'])" "$work/calls.json")
    "$venv/bin/python" - "$work/calls.json" "$n" "$work/call$n" <<'PY'
import json, sys
call = json.load(open(sys.argv[1]))[int(sys.argv[2]) - 1]
open(sys.argv[3] + ".command", "w").write(call["command"] + " --cpu-smoke")
open(sys.argv[3] + ".carry", "w").write("\n".join(call["carry"]) + "\n")
open(sys.argv[3] + ".timeout", "w").write(str(call["timeout_s"]))
PY
    tree="$work/tree$n" out="$work/out$n"
    mkdir -p "$tree" "$out"
    git ls-files -co --exclude-standard -z | tar -c --null -T - -f - | tar -x -C "$tree"
    carried=0 names=()
    while read -r path; do
        [ -n "$path" ] && [ -e "$path" ] || continue
        cp -r "$path" "$tree/$path"
        carried=$(( carried + $(du -sb "$path" | cut -f1) ))
        names+=("$path")
    done <"$work/call$n.carry"
    total=$(( tree_bytes + carried ))
    if [ "$total" -gt $(( 64 * 1048576 )) ]; then
        say "call $n ($part) would send $(mib "$total") MiB, over 64" >&2
        failed=1
    fi
    say "call $n ($part): $(wc -c <"$work/call$n.command") characters, carry ${names[*]:-nothing}, $(mib "$total") MiB sent"
    t=$(date +%s)
    rc=0
    (cd "$tree" && env -u PYTHON -u PYTHONPATH -u VIRTUAL_ENV -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PATH="$venv/bin:/usr/bin:/bin" \
        OUT="$out" SITE="$work/site$n" timeout "$(cat "$work/call$n.timeout")" bash -c "$(cat "$work/call$n.command")") \
        >"$work/call$n.log" 2>&1 || rc=$?
    tail -5 "$work/call$n.log" | sed "s/^/    /"
    if [ "$rc" -ne 0 ]; then
        say "call $n ($part) exited $rc after $(( $(date +%s) - t )) s; its log:" >&2
        tail -40 "$work/call$n.log" >&2
        failed=1
    fi
    "$venv/bin/python" benchmarks/gpu_check.py check-out "$out" | sed "s/^/    /" || failed=1
    for f in ${expect[$part]}; do
        [ -s "$out/$f" ] || { say "call $n ($part): \$OUT lacks $f (has: $(ls "$out" | tr '\n' ' '))" >&2; failed=1; }
    done
    summary+=("$n $part ($(mib "$total") MiB: tree $(mib "$tree_bytes") + ${names[*]:-nothing} $(mib "$carried"); $(ls "$out" | wc -l) files back; $(( $(date +%s) - t )) s)")
done
if [ "$failed" -ne 0 ]; then
    say "FAILED after $(( $(date +%s) - start )) s: ${summary[*]}" >&2
    exit 1
fi
say "ok in $(( $(date +%s) - start )) s: calls ${summary[0]}, ${summary[1]}, ${summary[2]} would run (call 4, DALI, needs its parts: not rehearsed)"
