#!/usr/bin/env bash
# The wheels the project's GPU machine lacks, downloaded where pip works, for the device calls of
# benchmarks/GPU.md to carry (the machine has no registry).
#
# .whl/ (always; git-ignored, about 0.35 MiB): tyro 1.0.17 and its pure-Python needs docstring-parser
# and typeguard 4.6.1, plus typing_extensions 4.16.0: typeguard 4.6.1 needs typing_extensions >= 4.14
# and torch 2.11 only guarantees >= 4.10, so the bundle brings its own (gpu_check.sh checks which one
# is imported). Every device call names .whl in `carry`; a call that forgets it returns exit code 2
# from gpu_check.sh and a line saying so.
#
# --dali (optional, 246 MiB): DALI for CUDA 13 / Python 3.12 and its needs (../shared/GPU.md), as one
# tar split into parts .dali1 ... .daliN (git-ignored folders), each small enough to travel with the
# working tree and .whl in one call (64 MiB); the last part holds the tar's SHA-256. Refuses when more
# than 4 parts would be needed (the check has 4 calls to carry them).
#
#   bash benchmarks/gpu_bundle.sh            # .whl/
#   bash benchmarks/gpu_bundle.sh --dali     # .whl/ and .dali1 ... .dali4
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
WHEELS=(tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0)
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvimgcodec-cu13==0.9.0.20 libcst==1.9.0 nvtx==0.2.17
      optree==0.20.0 astunparse gast makefun)
download() {  # into $1, one name at a time, for the GPU machine's Python 3.12 on x86-64
    local dir=$1 spec
    shift
    for spec in "$@"; do
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" "$spec"
    done
}
mib() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.2f", s / 1048576}'; }
for d in .whl .dali1 .dali2 .dali3 .dali4 .dali5; do  # never committed, never sent unless carried
    git check-ignore -q "$d/x" || { echo "gpu_bundle: $d is not git-ignored; add it to .gitignore" >&2; exit 2; }
done
rm -rf .whl && mkdir -p .whl
download .whl "${WHEELS[@]}"
echo "gpu_bundle: .whl/ $(mib .whl) MiB: $(cd .whl && ls | tr '\n' ' ')"
if [ "${1:-}" = --dali ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    download "$tmp/wheels" "${DALI[@]}"
    (cd "$tmp/wheels" && tar cf ../dali.tar ./*.whl)
    (cd "$tmp" && sha256sum dali.tar >dali.tar.sha256)
    # what travels with each call besides a part: the working tree (tracked + untracked-not-ignored) and .whl
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    room=$(( 64 * 1048576 - tree - $(du -sb .whl | cut -f1) - 262144 ))  # 256 KiB to spare: 246 MiB in 4 parts leaves little
    total=$(stat -c %s "$tmp/dali.tar")
    parts=$(( (total + room - 1) / room ))
    if [ "$parts" -gt 4 ]; then
        echo "gpu_bundle: DALI needs $parts parts of $((room / 1048576)) MiB; the check carries 4: make the working tree smaller" >&2
        exit 2
    fi
    size=$(( (total + parts - 1) / parts ))
    rm -rf .dali1 .dali2 .dali3 .dali4 .dali5
    (cd "$tmp" && split -b "$size" -d -a 1 dali.tar part.)
    for i in $(seq 1 "$parts"); do
        mkdir -p ".dali$i"
        mv "$tmp/part.$((i - 1))" ".dali$i/"
    done
    cp "$tmp/dali.tar.sha256" ".dali$parts/"
    echo "gpu_bundle: DALI $(( total / 1048576 )) MiB in $parts parts: $(for i in $(seq 1 "$parts"); do printf '.dali%s %s MiB  ' "$i" "$(mib ".dali$i")"; done)"
    echo "gpu_bundle: working tree $(( tree / 1048576 )) MiB; each call sends at most $(( (tree + size) / 1048576 + 1 )) MiB of 64"
fi
