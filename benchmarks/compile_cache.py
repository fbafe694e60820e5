"""Time to the first training step with torch.compile: a cold start against a restarted job that
finds the run's persistent compile cache (``<out>/compile_cache``).

Runs ``fastafd train`` three times in fresh processes: (1) cold, a new run folder and an empty
cache; (2) warm, a new run folder given the first run's cache folder (a requeued job on another
node, reading the shared run folder); (3) cold again, to show the spread. Each process records
``time_to_first_step_s`` (process start of training to the end of step 1) in ``startup.jsonl``.

    python benchmarks/compile_cache.py [--peers cifar_resnet8 cifar_resnet8] [--image-size 32]
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


def run(out: Path, cache: Path, peers: list[str], image_size: int) -> float:
    cmd = [
        sys.executable, "-m", "fastafd.cli", "train", "--out", str(out), "--data.format", "synthetic",
        "--data.synthetic_classes", "10", "--data.batch_size", "16", "--data.image_size", str(image_size),
        "--model.peers", *peers, "--loop.epochs", "1", "--loop.max_steps_per_epoch", "2",
        "--system.compile", "on", "--system.compile_cache", str(cache), "--log.progress", "off",
        "--log.tensorboard", "off", "--checkpoint.every_steps", "0",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "startup.jsonl").read_text().splitlines()]
    return float(rows[-1]["time_to_first_step_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", nargs="+", default=["cifar_resnet8", "cifar_resnet8"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fastafd-compile-"))
    try:
        cold_cache = work / "cache-a"
        cold = run(work / "run-a", cold_cache, args.peers, args.image_size)
        warm = run(work / "run-b", cold_cache, args.peers, args.image_size)
        cold2 = run(work / "run-c", work / "cache-c", args.peers, args.image_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from fastafd.run import env

    report = {
        "benchmark": "compile_cache",
        "peers": args.peers,
        "image_size": args.image_size,
        "time_to_first_step_s": {"cold": cold, "warm_cache": warm, "cold_again": cold2},
        "speedup_warm_vs_cold": min(cold, cold2) / warm,
        "versions": env.versions(),
        "cpu": env.cpu_name(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/compile_cache.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    md = (
        f"# Time to first step with torch.compile ({' + '.join(args.peers)}, {args.image_size} px, CPU)\n\n"
        f"Command: `{report['command']}`; torch {report['versions']['torch']}; {report['date']}\n\n"
        "| start | time to first step (s) |\n| --- | ---: |\n"
        f"| cold (empty cache) | {cold:.1f} |\n| warm (the run's compile cache) | {warm:.1f} |\n| cold again | {cold2:.1f} |\n\n"
        f"Warm start: {report['speedup_warm_vs_cold']:.1f}x faster to the first step than the faster cold start.\n"
    )
    (args.out / "compile_cache.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
