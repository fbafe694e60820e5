"""Accuracy of AFD's two iteration orders on the built-in demo data: the default ``sequential``
(docs/method.md) against the opt-in ``simultaneous`` speed mode, same seeds, several runs.

    python benchmarks/orders.py [--seeds 0 1 2] [--epochs 8]

Writes benchmarks/results/orders.json and orders.md (final top-1 of each peer and of the ensemble,
and the epoch's img/s, per run; mean and spread per order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fastafd-orders-"))
    runs = []
    for seed in args.seeds:
        for order in ("sequential", "simultaneous"):
            out = work / f"{order}-{seed}"
            cmd = [sys.executable, "-m", "fastafd.cli", "train", "--out", str(out), "--method.order", order,
                   "--system.seed", str(seed), "--loop.epochs", str(args.epochs), "--log.progress", "off"]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            last = rows[-1]
            runs.append({
                "order": order, "seed": seed,
                "top1": [p["top1"] for p in last["peers"]], "ensemble_top1": last["ensemble_top1"],
                "img_per_s": statistics.median(r["img_per_s"] for r in rows),
            })  # fmt: skip
            print(runs[-1], flush=True)
    summary = {}
    for order in ("sequential", "simultaneous"):
        mine = [r for r in runs if r["order"] == order]
        peers = [statistics.mean(r["top1"]) for r in mine]
        summary[order] = {
            "peer_top1_mean": statistics.mean(peers), "peer_top1_stdev": statistics.stdev(peers) if len(peers) > 1 else 0.0,
            "ensemble_top1_mean": statistics.mean(r["ensemble_top1"] for r in mine),
            "img_per_s_median": statistics.median(r["img_per_s"] for r in mine),
        }  # fmt: skip
    report = {"benchmark": "orders", "recipe": "demo", "epochs": args.epochs, "runs": runs, "summary": summary,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python benchmarks/orders.py " + " ".join(sys.argv[1:])}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "orders.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# AFD iteration order on the demo data ({args.epochs} epochs, seeds {' '.join(map(str, args.seeds))})", "",
             f"Command: `{report['command']}`; {report['date']}", "",
             "| order | seed | peer 0 top-1 | peer 1 top-1 | ensemble top-1 | img/s (median epoch) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in runs:
        lines.append(f"| {r['order']} | {r['seed']} | {r['top1'][0]:.2f} | {r['top1'][1]:.2f} | {r['ensemble_top1']:.2f} | {r['img_per_s']:.0f} |")
    lines += ["", "| order | mean peer top-1 | stdev over runs | mean ensemble top-1 | img/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for order, v in summary.items():
        lines.append(f"| {order} | {v['peer_top1_mean']:.2f} | {v['peer_top1_stdev']:.2f} | {v['ensemble_top1_mean']:.2f} | {v['img_per_s_median']:.0f} |")
    (args.out / "orders.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
