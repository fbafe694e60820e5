"""Optimizer step time: torch's fused SGD/Adam (what fastafd uses) against the default implementations.

The parameters of the step benchmark's peers (two timm ResNet-18 by default) with random gradients;
AFD's settings (SGD: momentum 0.9, weight decay 1e-4; Adam: weight decay 0.1). Each implementation
is timed over ``--repeats`` windows of ``--steps`` steps after a warm-up; median, min and max.

    python benchmarks/optimizers.py                 # writes benchmarks/results/optimizers.{json,md}
    python benchmarks/optimizers.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

from fastafd.run.env import hardware

RESULTS = Path(__file__).parent / "results"
IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def time_step(opt: torch.optim.Optimizer, device: torch.device, steps: int, repeats: int) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        opt.step()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync()
        out.append((time.perf_counter() - t0) / steps * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", nargs="+", default=["resnet18", "resnet18"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    params = [q for name in a.peers for q in timm.create_model(name, num_classes=1000).to(device).parameters()]
    for q in params:
        q.grad = torch.randn_like(q)
    settings = {"SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
                "Adam": (torch.optim.Adam, {"lr": 2e-5, "weight_decay": 0.1})}
    rows = []
    for opt_name, (cls, kw) in settings.items():
        for impl, flags in IMPLS.items():
            ms = time_step(cls(params, **kw, **flags), device, a.steps, a.repeats)
            rows.append({"optimizer": opt_name, "impl": impl, "ms_median": statistics.median(ms), "ms_min": min(ms),
                         "ms_max": max(ms), "ms": ms})
            print(f"{opt_name} {impl}: {statistics.median(ms):.2f} ms/step", file=sys.stderr)
    speedup = {o: {r["impl"]: r["ms_median"] for r in rows if r["optimizer"] == o} for o in settings}
    speedup = {o: {"fused vs foreach": d["foreach"] / d["fused"], "fused vs for-loop": d["for-loop"] / d["fused"]}
               for o, d in speedup.items()}
    n = sum(q.numel() for q in params)
    info = hardware(device)
    hw = info.get("gpu") or info.get("cpu") or platform.machine()
    report = {"benchmark": "optimizer step", "command": "python benchmarks/optimizers.py " + " ".join(argv or sys.argv[1:]),
              "device": str(device), "hardware": hw, "threads": torch.get_num_threads(), "parameters": n,
              "peers": a.peers, "torch": torch.__version__, "rows": rows, "speedup": speedup,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "optimizers.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Optimizer step time", "",
             f"`{report['command']}` on {device} ({hw}, {report['threads']} threads), torch {torch.__version__}; "
             f"{n / 1e6:.1f} M parameters ({' + '.join(a.peers)}), median of {a.repeats} windows of {a.steps} steps.", "",
             "| optimizer | implementation | ms/step median | min | max |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['optimizer']} | {r['impl']} | {r['ms_median']:.2f} | {r['ms_min']:.2f} | {r['ms_max']:.2f} |" for r in rows]
    lines += ["", *(f"{o}: fused is {s['fused vs foreach']:.1f}x faster than foreach, {s['fused vs for-loop']:.1f}x than the "
                    "for-loop" for o, s in speedup.items()), ""]
    (a.out / "optimizers.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
