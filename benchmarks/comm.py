"""Gradient communication: step time with and without overlapping the all-reduce with backward, and a model
of the exposed communication time per iteration for given bus bandwidths.

Measured part: ``accelerate launch`` of N CPU processes (gloo), each training fastafd's AFD iteration
(sequential order) of the given peers on in-memory batches, alternating windows of the coalesced
all-reduce after each backward (``--system.overlap_comm off``, the reference) and the bucketed one
overlapped with backward (the default); median seconds per iteration of each, and their ratio, in
one run. On a CPU machine the processes share the cores with gloo's own threads, so this shows that
the overlapped path works and what it costs or saves there, not what a GPU cluster gains.

Model part: the all-reduce bytes of each stage of the same task (fp32 gradients, or bf16 with
compression), and for each bus bandwidth the ring all-reduce time ``2 (W - 1) / W x bytes / busbw``
per iteration, all of it exposed without overlap; with overlap, at best only each stage's last bucket
(reduced after its backward ends) stays exposed, when backward takes longer than the other buckets'
all-reduces (the usual case on NVLink and 400 Gb/s NICs).

    python benchmarks/comm.py                          # 2 and 4 processes, writes benchmarks/results/comm.{json,md}
    python benchmarks/comm.py --processes 2 --steps 3 --out /tmp/comm
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
BANDWIDTHS_GBPS = {"NVLink/NVSwitch node (450 GB/s bus)": 450.0, "400 Gb/s NIC per node (50 GB/s)": 50.0,
                   "200 Gb/s (25 GB/s)": 25.0, "100 Gb/s (12.5 GB/s)": 12.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task(peers: list[str], image_size: int, batch: int, overlap: bool, bucket_mb: float):
    import torch

    from fastafd.comm import make_grad_sync
    from fastafd.config import DataConfig, LoopConfig, MethodConfig, ModelConfig, SystemConfig, TrainConfig
    from fastafd.methods import Numerics, build_task
    from fastafd.optim import build_stages

    cfg = TrainConfig(model=ModelConfig(peers=tuple(peers), num_classes=100), method=MethodConfig(name="afd"),
                      data=DataConfig(format="synthetic", batch_size=batch, image_size=image_size), loop=LoopConfig(epochs=1),
                      system=SystemConfig(device="cpu"))
    torch.manual_seed(0)
    task = build_task(cfg, 100, Numerics("cpu", torch.float32), torch.device("cpu"), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sync = make_grad_sync(world, overlap=overlap, bucket_mb=bucket_mb, compression="none")
    stages = build_stages(task, cfg, device=torch.device("cpu"), dtype=torch.float32, steps_per_epoch=1000, grad_sync=sync)
    stages.set_step(0)
    return task, stages


def worker(args: argparse.Namespace) -> None:
    """One training process: alternating timed windows of both syncs; rank 0 writes the times."""
    import torch

    from fastafd import dist
    from fastafd.config import SystemConfig

    rt = dist.setup(SystemConfig(device="cpu", dist_timeout_s=600))
    per_rank = args.batch // rt.world_size
    g = torch.Generator().manual_seed(rt.rank)
    x = torch.randn(per_rank, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 100, (per_rank,), generator=g)
    runs = {name: _task(args.peers, args.image_size, args.batch, overlap, args.bucket_mb) for name, overlap in
            (("coalesced", False), ("overlapped", True))}
    times: dict[str, list[float]] = {name: [] for name in runs}

    def window(name: str, steps: int) -> float:
        task, stages = runs[name]
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            with stages.iteration():
                task.train_step(x, y, stages)
        torch.distributed.barrier()
        return (time.perf_counter() - start) / steps

    for name in runs:
        window(name, args.warmup)
    for _ in range(args.repeats):
        for name in runs:
            times[name].append(window(name, args.steps))
    if rt.rank == 0:
        Path(args.worker_out).write_text(json.dumps(times))
    rt.accelerator.end_training()


def measure(args: argparse.Namespace, processes: int, tmp: Path) -> dict:
    out = tmp / f"times-{processes}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--worker",
           "--worker-out", str(out), "--peers", *args.peers, "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats), "--bucket-mb", str(args.bucket_mb)]
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=3600)
    times = json.loads(out.read_text())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"processes": processes, "threads_per_process": threads, "seconds_per_iteration": times, "median_s": med,
            "overlapped_speedup": med["coalesced"] / med["overlapped"]}


def comm_model(args: argparse.Namespace, world_sizes: list[int]) -> dict:
    """Gradient bytes per stage and bucket of the task, and the ring all-reduce time they cost."""
    _, stages = _task(args.peers, args.image_size, args.batch, False, args.bucket_mb)
    from fastafd.comm import OverlappedSync

    sync = OverlappedSync(args.bucket_mb)
    stage_bytes, last_bucket = {}, {}
    for name, stage in stages.items():
        plan = sync._plan(stage)
        stage_bytes[name] = sum(b.flat.numel() * 4 for b in plan.buckets)
        last_bucket[name] = plan.buckets[-1].flat.numel() * 4
    rows = []
    for label, bw in BANDWIDTHS_GBPS.items():
        for w in world_sizes:
            factor = 2 * (w - 1) / w / (bw * 1e9) * 1e3  # ms per byte
            for wire, scale in (("fp32", 1.0), ("bf16", 0.5)):
                total = sum(stage_bytes.values()) * scale * factor
                exposed = sum(last_bucket.values()) * scale * factor
                rows.append({"fabric": label, "busbw_GBps": bw, "world_size": w, "wire": wire, "no_overlap_ms": total,
                             "overlap_best_ms": exposed})
    return {"stage_bytes": stage_bytes, "last_bucket_bytes": last_bucket, "rows": rows}


def markdown(report: dict) -> str:
    a = report["args"]
    lines = ["# Gradient communication: overlapped vs coalesced all-reduce", "",
             f"Command: `{report['command']}`; {report['date']}; {report['hardware']}; torch {report['torch']}; git {report['git_sha']}.", "",
             f"AFD (sequential) on {' + '.join(a['peers'])}, {a['image_size']} px, global batch {a['batch']}, CPU processes over gloo, "
             f"{a['bucket_mb']} MiB buckets; {a['repeats']} alternating windows of {a['steps']} iterations each after {a['warmup']} warm-up "
             f"iterations (1-min load average {report['load_before']:.1f} before, {report['load_after']:.1f} after).", "",
             "| processes | coalesced s/iter (median) | overlapped s/iter (median) | coalesced / overlapped |", "| ---: | ---: | ---: | ---: |"]
    for m in report["measured"]:
        lines.append(f"| {m['processes']} | {m['median_s']['coalesced']:.3f} | {m['median_s']['overlapped']:.3f} | {m['overlapped_speedup']:.2f}x |")
    model = report["model"]
    mb = {k: v / 2**20 for k, v in model["stage_bytes"].items()}
    lines += ["", "Gradient bytes all-reduced per iteration (fp32): " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mb.items())
              + f" = {sum(mb.values()):.1f} MiB; last bucket per stage (stays exposed with overlap): "
              + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in model["last_bucket_bytes"].items()) + ".", "",
              "Model: ring all-reduce `2 (W-1)/W x bytes / busbw` per iteration, ms exposed per iteration:", "",
              "| fabric | W | wire | no overlap | overlap (best: last buckets only) |", "| --- | ---: | --- | ---: | ---: |"]
    for r in model["rows"]:
        lines.append(f"| {r['fabric']} | {r['world_size']} | {r['wire']} | {r['no_overlap_ms']:.2f} | {r['overlap_best_ms']:.2f} |")
    lines += ["", "The overlap column is a bound: it holds when each stage's backward lasts longer than the all-reduce of its "
              "other buckets; on a slower fabric the part of the all-reduce that outlasts the backward is exposed too.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--peers", nargs="+", default=["resnet18", "resnet18"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--model-world-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.worker:
        worker(args)
        return 0
    import tempfile

    import torch

    from fastafd import rundir
    from fastafd.bench.step import hardware

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fastafd-comm-") as tmp:
        measured = [measure(args, n, Path(tmp)) for n in args.processes]
    load_after = os.getloadavg()[0]
    report = {"benchmark": "comm", "command": "python benchmarks/comm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "worker_out")},
              "hardware": hardware(torch.device("cpu")).get("cpu", ""), "torch": torch.__version__, "git_sha": rundir.git_sha(),
              "measured": measured, "model": comm_model(args, args.model_world_sizes), "load_before": load_before,
              "load_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comm.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "comm.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
