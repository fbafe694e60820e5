"""Gradient communication: step time with and without overlapping the all-reduce with backward, in eager and
compiled mode, against torch's DistributedDataParallel, and a model of the exposed communication time per
iteration for given bus bandwidths.

Measured part: ``accelerate launch`` of N CPU processes (gloo), each running groups of two variants on
in-memory batches, with alternating timed windows of the two (median seconds per iteration of each,
and their ratio, in one run):

* ``afd`` groups (AFD, sequential and simultaneous order): the coalesced all-reduce after each backward
  (``--system.overlap_comm off``, the reference) against the bucketed one overlapped with backward (the
  default), in eager mode and compiled (``torch.compile``, Inductor, ``system.compile_scope=regional``:
  each peer's blocks compiled on their own);
* ``ddp`` groups (``independent``, ``dml``, ``kdcl``: one backward per iteration, where DDP applies):
  fastafd's overlapped path against ``DistributedDataParallel`` over the same peers (same bucket size,
  ``gradient_as_bucket_view``, no per-step buffer broadcast, as fastafd), the same loss and the same
  fused optimizer; compiled: fastafd's regional compile against ``torch.compile`` of the DDP module
  (DDP's own graph splitting at bucket boundaries, ``DDPOptimizer``).

One group (``--profile``) is then profiled on rank 0 for a few iterations of each variant: the
exposed communication per iteration is the time the training thread spends in the stages' sync
``reduce()`` (a ``record_function`` range read back from the profiler's events): the coalesced
all-reduce in full, or with overlap the wait for the buckets that backward did not hide.

On a CPU machine the processes share the cores with gloo's own threads, so this shows that the paths
work and what they cost or save there, not what a GPU cluster gains.

Model part: the all-reduce bytes of each stage of the same task (fp32 gradients, or bf16 with
compression), and for each bus bandwidth the ring all-reduce time ``2 (W - 1) / W x bytes / busbw``
per iteration, all of it exposed without overlap; with overlap, at best only each stage's last bucket
(reduced after its backward ends) stays exposed, when backward takes longer than the other buckets'
all-reduces (the usual case on NVLink and 400 Gb/s NICs).

    python benchmarks/comm.py                          # 2 and 4 processes, writes benchmarks/results/comm.{json,md}
    python benchmarks/comm.py --processes 2 --steps 3 --groups eager:afd:sequential --out /tmp/comm
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
GROUPS = ["eager:afd:sequential", "compiled:afd:sequential", "eager:afd:simultaneous", "compiled:afd:simultaneous",
          "eager:ddp:independent", "compiled:ddp:independent", "eager:ddp:dml", "compiled:ddp:dml",
          "eager:ddp:kdcl", "compiled:ddp:kdcl"]
"""``mode:kind:what``: mode eager|compiled; kind afd (what: the order; coalesced vs overlapped) or ddp
(what: the method; fastafd overlapped vs DistributedDataParallel)."""
VARIANTS = {"afd": ("coalesced", "overlapped"), "ddp": ("ddp", "fastafd")}
"""Per kind: (baseline, fastafd's path); the ratio is baseline s/iter over fastafd's."""
REDUCE_RANGE = "fastafd.grad_sync.reduce"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task(peers: list[str], image_size: int, batch: int, overlap: bool, bucket_mb: float, method: str = "afd",
          order: str = "sequential", compiled: bool = False, ddp: bool = False):
    import torch

    from fastafd.comm import LocalSync, make_grad_sync
    from fastafd.config import DataConfig, LoopConfig, MethodConfig, ModelConfig, SystemConfig, TrainConfig
    from fastafd.methods import Numerics, build_task
    from fastafd.optim import build_stages

    cfg = TrainConfig(model=ModelConfig(peers=tuple(peers), num_classes=100), method=MethodConfig(name=method, order=order),
                      data=DataConfig(format="synthetic", batch_size=batch, image_size=image_size), loop=LoopConfig(epochs=1),
                      system=SystemConfig(device="cpu"))
    torch.manual_seed(0)
    task = build_task(cfg, 100, Numerics("cpu", torch.float32), torch.device("cpu"), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sync = LocalSync() if ddp else make_grad_sync(world, overlap=overlap, bucket_mb=bucket_mb, compression="none")
    stages = build_stages(task, cfg, device=torch.device("cpu"), dtype=torch.float32, steps_per_epoch=1000, grad_sync=sync)
    stages.set_step(0)
    task.train()
    if ddp:
        return _ddp_step(task, stages, bucket_mb, compiled), stages
    if compiled:
        task.compile("regional")
    return task.train_step, stages


def _ddp_step(task, stages, bucket_mb: float, compiled: bool):
    """One iteration of a single-stage task with DistributedDataParallel doing the gradient all-reduce."""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    class Peers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.task = task

        def forward(self, x):
            return self.task.forward_peers(x)[1]

    model = DistributedDataParallel(Peers(), bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True, broadcast_buffers=False)
    forward = torch.compile(model) if compiled else model
    loss_fn = task.kdcl_loss if hasattr(task, "kdcl_loss") else (lambda z, y: task.logit_loss(z, y, kl=task.use_kl))
    stage = stages["logit"]

    def step(x, y, _stages):
        loss, metrics = loss_fn(forward(x), y)
        stage.step(loss)
        return metrics

    return step


def worker(args: argparse.Namespace) -> None:
    """One training process: per group, alternating timed windows of its two variants; rank 0 writes the times."""
    import gc

    import torch

    from fastafd import compile_cache, dist
    from fastafd.config import SystemConfig

    rt = dist.setup(SystemConfig(device="cpu", dist_timeout_s=1800))
    if args.cache:
        compile_cache.enable(Path(args.cache))
    per_rank = args.batch // rt.world_size
    g = torch.Generator().manual_seed(rt.rank)
    x = torch.randn(per_rank, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 100, (per_rank,), generator=g)
    results: dict = {"times": {}, "profile": {}}
    for group in args.groups:
        mode, kind, what = group.split(":")
        runs = {}
        for name in VARIANTS[kind]:
            kw = dict(method="afd", order=what) if kind == "afd" else dict(method=what)
            runs[name] = _task(args.peers, args.image_size, args.batch, name != "coalesced", args.bucket_mb,
                               compiled=mode == "compiled", ddp=name == "ddp", **kw)
        times: dict[str, list[float]] = {name: [] for name in runs}

        def window(name: str, steps: int) -> float:
            step, stages = runs[name]
            torch.distributed.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                with stages.iteration():
                    step(x, y, stages)
            torch.distributed.barrier()
            return (time.perf_counter() - start) / steps

        for name in runs:
            window(name, args.warmup)
        for _ in range(args.repeats):
            for name in runs:
                times[name].append(window(name, args.steps))
        results["times"][group] = times
        if group == args.profile:
            results["profile"] = {"group": group, "iterations": args.steps, "exposed_ms": {}}
            for name, (_, stages) in runs.items():
                for stage in stages.values():  # each stage owns its sync
                    def timed(flag, _reduce=stage.sync.reduce):  # the time the training thread is blocked in the sync after a backward
                        with torch.profiler.record_function(REDUCE_RANGE):
                            _reduce(flag)

                    stage.sync.reduce = timed
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    window(name, args.steps)
                if rt.rank == 0 and args.trace:
                    prof.export_chrome_trace(str(Path(args.trace).with_suffix(f".{name}.json")))
                total_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key == REDUCE_RANGE)
                results["profile"]["exposed_ms"][name] = total_us / 1e3 / args.steps
        runs.clear()
        gc.collect()
        if rt.rank == 0:
            print(group, {k: round(statistics.median(v), 3) for k, v in times.items()}, flush=True)
    if rt.rank == 0:
        Path(args.worker_out).write_text(json.dumps(results))
    rt.accelerator.end_training()


def measure(args: argparse.Namespace, processes: int, tmp: Path) -> dict:
    out = tmp / f"times-{processes}.json"
    ddp_counts = args.ddp_processes or args.processes
    groups = [g for g in args.groups if g.split(":")[1] != "ddp" or processes in ddp_counts]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--worker",
           "--worker-out", str(out), "--peers", *args.peers, "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats), "--bucket-mb", str(args.bucket_mb),
           "--groups", *groups, "--profile", args.profile, "--cache", str(tmp / "compile_cache"),
           "--trace", str(tmp / f"trace-{processes}")]
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=7200)
    res = json.loads(out.read_text())
    rows = []
    for group, times in res["times"].items():
        mode, kind, what = group.split(":")
        base, ours = VARIANTS[kind]
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"group": group, "mode": mode, "kind": kind, "what": what, "seconds_per_iteration": times, "median_s": med,
                     "ratio": med[base] / med[ours]})
    return {"processes": processes, "threads_per_process": threads, "groups": rows, "profile": res["profile"]}


def comm_model(args: argparse.Namespace, world_sizes: list[int]) -> dict:
    """Gradient bytes per stage and bucket of the task, and the ring all-reduce time they cost."""
    _, stages = _task(args.peers, args.image_size, args.batch, False, args.bucket_mb)
    from fastafd.comm import OverlappedSync

    sync = OverlappedSync(args.bucket_mb)
    stage_bytes, last_bucket = {}, {}
    for name, stage in stages.items():
        plan = sync.for_params(stage.params, stage.optimizer).plan
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
    by = {(m["processes"], g["group"]): g for m in report["measured"] for g in m["groups"]}
    procs = [m["processes"] for m in report["measured"]]
    lines = ["# Gradient communication: overlapped vs coalesced all-reduce, eager and compiled, and against DDP", "",
             f"Command: `{report['command']}`; {report['date']}; {report['hardware']}; torch {report['torch']}; git {report['git_sha']}.", "",
             f"{' + '.join(a['peers'])}, {a['image_size']} px, global batch {a['batch']}, CPU processes over gloo (the 2 cores shared "
             f"by all processes and gloo's threads), {a['bucket_mb']} MiB buckets; compiled: torch.compile with CPU Inductor, fastafd's "
             f"regional scope; per group {a['repeats']} alternating windows of {a['steps']} iterations of each variant after "
             f"{a['warmup']} warm-up iterations (1-min load average {report['load_before']:.1f} before, {report['load_after']:.1f} after).", "",
             "## AFD: overlapped vs coalesced all-reduce", "",
             "| order | processes | mode | coalesced s/iter | overlapped s/iter | coalesced / overlapped | compiled gain / eager gain |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for order in ("sequential", "simultaneous"):
        for n in procs:
            eager = by.get((n, f"eager:afd:{order}"))
            for mode in ("eager", "compiled"):
                g = by.get((n, f"{mode}:afd:{order}"))
                if g is None:
                    continue
                kept = ""
                if mode == "compiled" and eager is not None and eager["ratio"] > 1:
                    kept = f"{(g['ratio'] - 1) / (eager['ratio'] - 1):.0%}"
                lines.append(f"| {order} | {n} | {mode} | {g['median_s']['coalesced']:.3f} | {g['median_s']['overlapped']:.3f} | "
                             f"{g['ratio']:.2f}x | {kept} |")
    lines += ["", "## fastafd's overlapped path vs torch DistributedDataParallel (one backward per iteration)", "",
              "| method | processes | mode | DDP s/iter | fastafd s/iter | DDP / fastafd (>= 1: fastafd at least as fast) |",
              "| --- | ---: | --- | ---: | ---: | ---: |"]
    for method in ("independent", "dml", "kdcl"):
        for n in procs:
            for mode in ("eager", "compiled"):
                g = by.get((n, f"{mode}:ddp:{method}"))
                if g is not None:
                    lines.append(f"| {method} | {n} | {mode} | {g['median_s']['ddp']:.3f} | {g['median_s']['fastafd']:.3f} | {g['ratio']:.2f}x |")
    for m in report["measured"]:
        prof = m["profile"]
        if prof:
            lines += ["", f"Exposed communication, from a profiler trace of `{prof['group']}` at {m['processes']} processes (rank 0, "
                      f"{prof['iterations']} iterations): time per iteration the training thread spends in the stages' sync after "
                      "their backward (all-reduce not overlapped with compute): "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in prof["exposed_ms"].items()) + "."]
    model = report["model"]
    mb = {k: v / 2**20 for k, v in model["stage_bytes"].items()}
    lines += ["", "## Model (AFD, sequential)", "", "Gradient bytes all-reduced per iteration (fp32): " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mb.items())
              + f" = {sum(mb.values()):.1f} MiB; last bucket per stage (stays exposed with overlap): "
              + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in model["last_bucket_bytes"].items()) + ".", "",
              "Ring all-reduce `2 (W-1)/W x bytes / busbw` per iteration, ms exposed per iteration:", "",
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
    p.add_argument("--groups", nargs="+", default=GROUPS, help="mode:kind:what (see GROUPS)")
    p.add_argument("--ddp-processes", type=int, nargs="+", default=None,
                   help="the process counts of the ddp groups (default: every count of --processes)")
    p.add_argument("--profile", default="compiled:afd:sequential", help="the group profiled for the exposed communication")
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    p.add_argument("--trace", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-world-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.worker:
        worker(args)
        return 0
    if unknown := set(args.ddp_processes or ()) - set(args.processes):
        p.error(f"--ddp-processes {sorted(unknown)}: not among --processes {args.processes}")
    import tempfile

    import torch

    from fastafd.run import env

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fastafd-comm-") as tmp:
        measured = [measure(args, n, Path(tmp)) for n in args.processes]
    load_after = os.getloadavg()[0]
    report = {"benchmark": "comm", "command": "python benchmarks/comm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "worker_out", "cache", "trace")},
              "hardware": env.hardware(torch.device("cpu")).get("cpu", ""), "torch": torch.__version__, "git_sha": env.git_sha(),
              "measured": measured, "model": comm_model(args, args.model_world_sizes), "load_before": load_before,
              "load_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comm.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "comm.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
