"""Time to the first training step with torch.compile, whole-unit against regional compilation
(``--system.compile_scope whole|regional``), from a cold and from a warm compile cache, on CPU.

For each peer set and each scope, ``fastafd train`` runs twice in fresh processes: cold (a new run
folder, an empty compile cache) and warm (a new run folder given the first run's cache, as a requeued
job). Each process records ``time_to_first_step_s`` (start of training to the end of step 1: build,
compile and the first AFD iteration) in ``startup.jsonl``. The scopes alternate within one run, so a
busy machine slows both alike.

    python benchmarks/compile_time.py                                     # resnet18 pair, deit_tiny pair
    python benchmarks/compile_time.py --sets cifar_resnet8,cifar_resnet8 --out /tmp/ct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, cache: Path, peers: list[str], image_size: int, scope: str, cap: float) -> float | None:
    """Seconds to the first step, or None when the run takes longer than ``cap`` seconds in all."""
    cmd = [
        sys.executable, "-m", "fastafd.cli", "train", "--out", str(out), "--data.format", "synthetic",
        "--data.synthetic_classes", "10", "--data.synthetic_samples", "64", "--data.batch_size", "16", "--data.image_size", str(image_size),
        "--model.peers", *peers, "--loop.epochs", "1", "--loop.max_steps_per_epoch", "1",
        "--system.compile", "on", "--system.compile_scope", scope, "--system.compile_cache", str(cache),
        "--log.progress", "off", "--log.tensorboard", "off", "--checkpoint.every_steps", "0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=cap)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "startup.jsonl").read_text().splitlines()]
    return float(rows[-1]["time_to_first_step_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["resnet18,resnet18", "deit_tiny_patch16_224,deit_tiny_patch16_224"],
                    help="peer sets, comma-separated names each")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--cap", type=float, default=600.0, help="seconds a run may take in all (slower: reported as > cap)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    rows = []
    for peer_set in args.sets:
        peers = peer_set.split(",")
        work = Path(tempfile.mkdtemp(prefix="fastafd-compile-time-"))
        try:
            row = {"peers": peers}
            for scope in ("whole", "regional"):
                cache = work / f"cache-{scope}"
                row[scope] = {"cold": run(work / f"{scope}-cold", cache, peers, args.image_size, scope, args.cap),
                              "warm": run(work / f"{scope}-warm", cache, peers, args.image_size, scope, args.cap)}
                print(peers, scope, row[scope], flush=True)
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    from fastafd.run import env

    report = {
        "benchmark": "compile_time", "image_size": args.image_size, "method": "afd (sequential)", "batch": 16, "rows": rows,
        "versions": env.versions(), "git_sha": env.git_sha(), "cpu": env.cpu_name(),
        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/compile_time.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_time.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Time to first step: whole-unit vs regional torch.compile (CPU, Inductor, {args.image_size} px, AFD, batch 16)", "",
        f"Command: `{report['command']}`; torch {report['versions']['torch']}; {report['cpus']} CPUs ({report['cpu']}); "
        f"git {report['git_sha']}; {report['date']}.", "",
        "Time from the start of training to the end of the first step (build, compile, one iteration), one fresh process each.", "",
        "| peers | cache | whole (s) | regional (s) | whole / regional |", "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        for start in ("cold", "warm"):
            w, r = row["whole"][start], row["regional"][start]
            ratio = f"{w / r:.2f}x" if w and r else ""
            fmt = lambda v: f"{v:.1f}" if v else f"> {args.cap:.0f} (run capped)"  # noqa: E731
            lines.append(f"| {' + '.join(row['peers'])} | {start} | {fmt(w)} | {fmt(r)} | {ratio} |")
    md = "\n".join(lines) + "\n"
    (args.out / "compile_time.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
