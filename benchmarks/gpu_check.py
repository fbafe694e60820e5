"""The GPU check: fastafd's CUDA tests, training-step throughput, the GPU data path and the overlapped
all-reduce on a GPU, in parts that each fit one device command and each leave results however they end.

Made for the project's lent H200 (no internet, no DALI, no tyro: see ``benchmarks/GPU.md`` for the exact
device calls). Every part writes each result to ``--out`` the moment it exists, so a command killed at
its time limit still returns everything that finished; every unit of work checks the part's deadline
(``--budget-s`` from the start of ``gpu_check.sh``) before it starts and is skipped, with the reason
written down, when too little time is left.

Parts, in the order of their value (one device command each):

1. ``tests``: ``pytest -m gpu tests/gpu`` with a per-test bound; one JSON line per test as it ends
   (``benchmarks/plugins/fastafd_jsonl.py``). Files: ``env.json``, ``tests.jsonl``, ``tests.log``, ``tests.md``.
2. ``step``: ``fastafd bench step`` at 224 px, batch 256, one process per variant, most valuable first
   (ResNet-18 pair: reference, afd-sequential, independent; ResNet-18 + ResNet-50: reference,
   afd-sequential; then afd-simultaneous and the second independent), against the targets (afd
   sequential >= 2.5x the reference of the same run; independent ResNet-18 pair >= 4,500 img/s).
   Files: one ``step-<peers>-<variant>.json`` per variant, ``step.md``.
3. ``data``: torchvision's GPU JPEG decode (``decode_jpeg(device="cuda")`` + crop/flip/normalize in
   torch) against torchvision ``ImageFolder`` + ``DataLoader`` in the same run, then fastafd's
   overlapped bucketed all-reduce (:mod:`fastafd.comm`) in 2 processes over gloo on CUDA tensors of
   the one GPU (NCCL refuses two ranks on one device) against the coalesced path: parameters equal,
   hooks fired during backward, seconds per iteration. Files: ``env.json``, ``data-decode.json``,
   ``comm-*.json``, ``data.md``.
4. ``dali`` (optional, needs DALI installed: GPU.md): DALI's "mixed" decode pipeline against
   torchvision's GPU decode, and the DALI GPU tests. Files: ``env.json``, ``dali.json``, ``dali-tests.jsonl``,
   ``dali-tests.log``, ``dali.md``.

``report`` merges the folders that came back into one Markdown page for ``benchmarks/results/``.
``--cpu-smoke`` runs every part tiny on the CPU (how the tests and ``gpu_rehearsal.sh`` check the plumbing).

    bash benchmarks/gpu_check.sh tests "$OUT"                 # on the GPU machine (GPU.md has the calls)
    python benchmarks/gpu_check.py step --out /tmp/gc --cpu-smoke
    python benchmarks/gpu_check.py report --out benchmarks/results/gpu-h200 gpu1/ gpu2/ gpu3/
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
TARGET_SPEEDUP = 2.5
"""afd sequential (the fast path at the paper's order) over the plain reference, same run."""
TARGET_INDEPENDENT = 4500.0
"""img/s of ``independent`` for a ResNet-18 pair at 224 px, batch 256, on one H100/H200."""
R18 = ("resnet18", "resnet18")
R18_R50 = ("resnet18", "resnet50")
STEP_PLAN = [(R18, "reference"), (R18, "afd-sequential"), (R18, "independent"), (R18_R50, "reference"),
             (R18_R50, "afd-sequential"), (R18, "afd-simultaneous"), (R18_R50, "independent")]
"""(peers, variant) of the step part, most valuable first: each pair's reference runs before its variants."""
SMOKE_PAIR = ("cifar_resnet8", "cifar_resnet8")
STEP_MIN_S = {"reference": 45.0, "compiled": 90.0, "smoke": 5.0}
"""Least time a step variant needs (process start, model build, compile, 58 steps): skipped with less left."""


# -- time, files, processes ----------------------------------------------------------------------------


class Clock:
    """The part's deadline: ``budget_s`` after ``GPU_CHECK_T0`` (set by gpu_check.sh at its start) or now."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
        self.deadline = self.t0 + budget_s

    def left(self) -> float:
        return self.deadline - time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0


def write_file(path: Path, text: str) -> None:
    """Written in place and flushed to disk: a result must survive the command being killed right after."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: object) -> None:
    write_file(path, json.dumps(obj, indent=1, default=str) + "\n")


def run_child(cmd: list[str], timeout_s: float, *, env: dict | None = None, log: Path | None = None, tail_lines: int = 60) -> dict:
    """Run ``cmd`` in its own process group, echo its output (and append it to ``log``), kill the group
    after ``timeout_s``. Returns exit code, seconds, whether it timed out, and the output's last lines."""
    start = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    logf = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            tail.append(line.rstrip("\n"))
            if logf:
                logf.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=10)
    if logf:
        if timed_out:
            logf.write(f"\n[gpu_check] killed after {timeout_s:.0f} s\n")
        logf.close()
    sys.stdout.flush()
    return {"exit_code": proc.returncode, "seconds": round(time.time() - start, 1), "timed_out": timed_out, "tail": "\n".join(tail)}


def child_env() -> dict:
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "PYTHONUNBUFFERED": "1"}


def environment() -> dict:
    import torch

    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                  "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None, "cpus": os.cpu_count()}
    for name in ("timm", "accelerate", "torchvision", "tyro", "typeguard", "typing_extensions", "safetensors", "nvidia.dali", "triton",
                 "pytest_timeout"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", None) or _dist_version(name)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            info[name] = f"not importable ({type(e).__name__})"
    try:  # DALI's nvimgcodec wants nvjpeg & co.: which CUDA libraries the machine has as wheels
        import importlib.metadata

        info["nvidia_wheels"] = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                                        if (d.metadata["Name"] or "").lower().startswith("nvidia")})
    except Exception as e:  # noqa: BLE001
        info["nvidia_wheels"] = f"unknown ({e})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            info["nvidia_smi"] = smi
            info["driver"] = smi.split(",")[1].strip() if smi.count(",") >= 2 else None
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable ({e})"
    return info


def _dist_version(module: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- part 1: tests ---------------------------------------------------------------------------------------


def run_tests(out: Path, clock: Clock, *, name: str, select: list[str], test_timeout_s: float) -> dict:
    """``pytest -m gpu`` with one JSON line per test (plugins/fastafd_jsonl.py) and the log, both as they happen."""
    jsonl, log = out / f"{name}.jsonl", out / f"{name}.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", *select, "-v", "-p", "no:cacheprovider", "-p", "fastafd_jsonl",
           f"--jsonl={jsonl}", f"--jsonl-deadline={clock.deadline - 15:.0f}", f"--timeout={test_timeout_s:.0f}"]
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH / "plugins"), env["PYTHONPATH"]])
    proc = run_child(cmd, clock.left() - 5, env=env, log=log, tail_lines=20)
    summary = summarize_tests(jsonl)
    summary.update(command="python -m " + " ".join(cmd[2:]), exit_code=proc["exit_code"], seconds=proc["seconds"], timed_out=proc["timed_out"])
    return summary


def summarize_tests(jsonl: Path) -> dict:
    """Counts and rows from a tests.jsonl, including the collected tests that never reported (killed or not reached)."""
    collected: list[str] = []
    cases: list[dict] = []
    finished, times = None, []
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            times.append(rec.get("time", 0))
            if rec["event"] == "collected":
                collected = rec["tests"]
            elif rec["event"] == "test":
                cases.append(rec)
            elif rec["event"] == "finished":
                finished = rec["exitstatus"]
    ended = {c["test"] for c in cases}
    missing = [t for t in collected if t not in ended]
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    counts["not finished"] = len(missing)
    return {"counts": counts, "cases": cases, "not_finished": missing, "pytest_exitstatus": finished,
            "seconds": round(times[-1] - times[0], 1) if times else 0}


def tests_markdown(t: dict, title: str = "GPU tests") -> str:
    c = t["counts"]
    lines = [f"## {title}: " + ", ".join(f"{v} {k}" for k, v in c.items()) + f" ({t.get('seconds', '?')} s)", ""]
    if t.get("command"):
        lines += [f"`{t['command']}`" + (" (killed at the part's limit)" if t.get("timed_out") else ""), ""]
    lines += ["| test | outcome | s | note |", "| --- | --- | ---: | --- |"]
    lines += [f"| {x['test'].split('::', 1)[-1]} | {x['outcome']} | {x['seconds']} | {x['message'].splitlines()[0][:200].replace('|', '/') if x['message'] else ''} |"
              for x in t["cases"]]
    lines += [f"| {n.split('::', 1)[-1]} | not finished | | killed at the limit, or not reached |" for n in t["not_finished"]]
    return "\n".join(lines) + "\n"


def part_tests(a: argparse.Namespace, clock: Clock) -> int:
    env = environment()
    write_json(a.out / "env.json", env)
    t = run_tests(a.out, clock, name="tests", select=[], test_timeout_s=a.test_timeout_s)
    write_file(a.out / "tests.md", f"# fastafd GPU tests\n\n{machine_line(env)}\n\n" + tests_markdown(t))
    print(tests_markdown(t))
    return 1 if t["counts"]["failed"] or t["counts"]["error"] or t["exit_code"] not in (0, 5) else 0


# -- part 2: step benchmarks -----------------------------------------------------------------------------


def step_plan(smoke: bool) -> list[tuple[tuple[str, ...], str, dict]]:
    if smoke:
        tiny = dict(image_size=32, batch_size=8, warmup=1, steps=1, repeats=2, device="cpu")
        return [(SMOKE_PAIR, v, tiny) for v in ("reference", "afd-sequential", "independent")]
    full = dict(image_size=224, batch_size=256, warmup=8, steps=10, repeats=5, device="cuda")
    return [(peers, v, full) for peers, v in STEP_PLAN]


def slug(peers: tuple[str, ...]) -> str:
    return "_".join(peers)


def step_targets(peers: tuple[str, ...], variant: str, result: dict, reference: dict | None) -> dict:
    targets = {}
    if reference and variant.startswith("afd"):
        targets[f"{variant}/reference"] = {"value": result["img_per_s_median"] / reference["img_per_s_median"], "target": TARGET_SPEEDUP}
    if variant == "independent" and tuple(peers) in (R18, SMOKE_PAIR):
        targets["independent img/s"] = {"value": result["img_per_s_median"], "target": TARGET_INDEPENDENT}
    for t in targets.values():
        t["met"] = t["value"] >= t["target"]
    return targets


def part_step(a: argparse.Namespace, clock: Clock) -> int:
    env = environment()
    cap = 120.0 if a.cpu_smoke else a.variant_cap_s
    done: dict[tuple[tuple[str, ...], str], dict] = {}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fastafd-gpucheck-step-") as tmp:
        for peers, variant, size in step_plan(a.cpu_smoke):
            stem = f"{slug(peers)}-{variant}"
            path = a.out / f"step-{stem}.json"
            need = STEP_MIN_S["smoke" if a.cpu_smoke else ("reference" if variant == "reference" else "compiled")]
            cmd = [sys.executable, "-m", "fastafd.cli", "bench", "step", "--peers", *peers, "--variants", variant,
                   "--image_size", str(size["image_size"]), "--batch_size", str(size["batch_size"]), "--device", size["device"],
                   "--warmup", str(size["warmup"]), "--steps", str(size["steps"]), "--repeats", str(size["repeats"]),
                   "--out", tmp, "--name", stem]
            record: dict = {"part": "step", "peers": list(peers), "variant": variant, "size": size,
                            "command": "fastafd " + " ".join(cmd[4:]).replace(tmp, "TMP"), "env": env}
            left = clock.left()
            if left < need:
                record.update(status="skipped", reason=f"deadline: {max(left, 0):.0f} s left of the part's budget, the variant needs at least {need:.0f} s")
            else:
                print(f"[gpu_check] step {stem}: up to {min(cap, left):.0f} s ({left:.0f} s left)", flush=True)
                proc = run_child(cmd, min(cap, left), env=child_env())
                record.update(seconds=proc["seconds"], exit_code=proc["exit_code"])
                report_path = Path(tmp) / f"step-{stem}.json"
                if proc["exit_code"] == 0 and report_path.is_file():
                    report = json.loads(report_path.read_text())
                    result = report["results"][0]
                    ref = done.get((peers, "reference"), {}).get("result")
                    record.update(status="ok", result=result, hardware=report["hardware"], versions=report["versions"],
                                  targets=step_targets(peers, variant, result, ref))
                else:
                    failed += 1
                    record.update(status="timed out" if proc["timed_out"] else "failed",
                                  reason=f"killed after {min(cap, left):.0f} s" if proc["timed_out"] else f"exit code {proc['exit_code']}",
                                  tail=proc["tail"][-6000:])
            done[(peers, variant)] = record
            write_json(path, record)
            write_file(a.out / "step.md", step_markdown(list(done.values()), env))
    print(step_markdown(list(done.values()), env))
    return 1 if failed else 0


def step_markdown(records: list[dict], env: dict) -> str:
    lines = ["# fastafd step throughput on the GPU check", "", machine_line(env), ""]
    for peers in dict.fromkeys(tuple(r["peers"]) for r in records):
        rows = [r for r in records if tuple(r["peers"]) == peers]
        s = rows[0]["size"]
        lines += [f"## {' + '.join(peers)}, {s['image_size']} px, batch {s['batch_size']}, {s['device']}", "",
                  "| variant | img/s median | min | max | first step s (compile) | status |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in rows:
            if r["status"] == "ok":
                v = r["result"]
                lines.append(f"| {r['variant']} | {v['img_per_s_median']:.1f} | {v['img_per_s_min']:.1f} | {v['img_per_s_max']:.1f} | "
                             f"{v['first_step_s']:.1f} | ok ({r['seconds']} s) |")
            else:
                lines.append(f"| {r['variant']} | | | | | {r['status']}: {r.get('reason', '')} |")
        targets = [(k, t) for r in rows if r["status"] == "ok" for k, t in r["targets"].items()]
        if targets:
            lines += ["", "| measure | value | target | met |", "| --- | ---: | ---: | --- |"]
            lines += [f"| {k} | {t['value']:.2f} | {t['target']:g} | {'yes' if t['met'] else 'no'} |" for k, t in targets]
        lines.append("")
    return "\n".join(lines)


# -- part 3: data path and gloo-on-CUDA all-reduce -------------------------------------------------------


def _jpeg_folder(root: Path, images: int) -> None:
    sys.path.insert(0, str(BENCH))
    from data import make_folder  # benchmarks/data.py: ImageNet-size JPEGs

    make_folder(root, images, classes=4)


def decode_makers(root: Path, batch: int, size: int, device: str, workers: int) -> dict:
    """Epoch iterators over the same JPEGs: torchvision's batched decode on ``device`` + crop/flip/normalize
    in torch (bf16 channels-last, the training layout), and torchvision ImageFolder + DataLoader (the
    baseline users run) with the batches copied to ``device``."""
    import torch
    import torchvision
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    sys.path.insert(0, str(BENCH))
    from data import torchvision_iter

    files = sorted((root / "train").rglob("*.JPEG"))
    datas = [torchvision.io.read_file(str(f)) for f in files]
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(3, 1, 1) * 255
    g = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def gpu_decode(epoch: int):
        for i in range(0, len(datas) - batch + 1, batch):
            imgs = decode_jpeg(datas[i: i + batch], device=device)
            out = []
            for img in imgs:
                h, w = img.shape[-2:]
                ch, cw = int(h * (0.3 + 0.7 * torch.rand(1, generator=g).item())), int(w * (0.3 + 0.7 * torch.rand(1, generator=g).item()))
                crop = F.resized_crop(img, 0, 0, ch, cw, [size, size], antialias=True)
                if torch.rand(1, generator=g).item() < 0.5:
                    crop = crop.flip(-1)
                out.append(((crop.float() - mean) / std).to(torch.bfloat16))
            x = torch.stack(out).contiguous(memory_format=torch.channels_last)
            yield x, None
        sync()

    loader = torchvision_iter(root, max(1, batch // 4), size, workers)  # a quarter batch: 1,024 images keep 16 workers busy

    def baseline(epoch: int):
        for x, y in loader(epoch):
            yield x.to(device, non_blocking=True), y
        sync()

    return {"torchvision decode_jpeg on the device": gpu_decode,
            f"torchvision ImageFolder + DataLoader ({workers} workers, batch {max(1, batch // 4)})": baseline}


def run_decode(a: argparse.Namespace) -> dict:
    sys.path.insert(0, str(BENCH))
    from data import time_interleaved

    device = "cpu" if a.cpu_smoke else "cuda"
    images, batch, size = (16, 4, 32) if a.cpu_smoke else (a.images, 256, 224)
    workers = 0 if a.cpu_smoke else min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="fastafd-gpucheck-jpeg-") as tmp:
        root = Path(tmp)
        t0 = time.time()
        _jpeg_folder(root, images)
        made = time.time() - t0
        files = sorted((root / "train").rglob("*.JPEG"))
        mean_kb = statistics.mean(f.stat().st_size for f in files) / 1024
        times, n = time_interleaved(decode_makers(root, batch, size, device, workers), repeats=2 if a.cpu_smoke else 3)
    rates = {k: [n / s for s in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    gpu, base = list(med)
    return {"device": device, "images": len(files), "images_per_epoch": n, "mean_file_kb": round(mean_kb, 1), "batch": batch, "size": size,
            "jpeg_generation_s": round(made, 1), "img_per_s": rates, "img_per_s_median": med, "ratio_median": med[gpu] / med[base],
            "ratio": f"{gpu} / {base}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comm_runs(smoke: bool) -> list[dict]:
    if smoke:
        return [dict(label="smoke-eager-fp32", peers=list(SMOKE_PAIR), image_size=32, batch=8, device="cpu", precision="fp32", compile=False,
                     warmup=1, steps=1, repeats=2, bucket_mb=0.05, need_s=10.0)]
    base = dict(peers=list(R18), image_size=64, batch=64, device="cuda", warmup=2, steps=5, repeats=3, bucket_mb=1.0)
    return [dict(base, label="eager-fp32", precision="fp32", compile=False, need_s=30.0),
            dict(base, label="compiled-bf16", precision="bf16", compile=True, need_s=90.0)]


def run_comm(run: dict, clock: Clock, cap_s: float) -> dict:
    """2 processes over gloo on the same device: overlapped (fastafd.comm.OverlappedSync) and coalesced syncs, alternating."""
    with tempfile.TemporaryDirectory(prefix="fastafd-gpucheck-comm-") as tmp:
        result = Path(tmp) / "result.json"
        port = _free_port()
        cmds = [[sys.executable, str(Path(__file__).resolve()), "_comm-worker", "--rank", str(r), "--port", str(port), "--result", str(result),
                 "--spec", json.dumps(run)] for r in range(2)]
        limit = min(cap_s, clock.left())
        threads = max(1, (os.cpu_count() or 2) // 2)
        env = {**child_env(), "OMP_NUM_THREADS": str(threads), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        procs: list[dict] = [{}, {}]

        def launch(i: int) -> None:
            procs[i] = run_child(cmds[i], limit, env=env, tail_lines=30)

        workers = [threading.Thread(target=launch, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out = json.loads(result.read_text()) if result.is_file() else {}
    ok = bool(out) and all(p["exit_code"] == 0 for p in procs)
    status = "ok" if ok else ("timed out" if any(p["timed_out"] for p in procs) else "failed")
    rec = {"status": status, "seconds": max(p["seconds"] for p in procs), **out}
    if not ok:
        rec["tail"] = "\n\n".join(f"rank {i}:\n{p['tail'][-3000:]}" for i, p in enumerate(procs))
    return rec


def comm_worker(rank: int, port: int, result: Path, spec: dict) -> None:
    """One rank: two fastafd tasks (coalesced and overlapped sync) from the same seed on the same batches,
    alternating timed windows, then both tasks' states compared (with each other and across ranks)."""
    from datetime import timedelta

    import torch
    import torch.distributed as tdist

    from fastafd import dist
    from fastafd.comm import make_grad_sync
    from fastafd.config import DataConfig, LoopConfig, MethodConfig, ModelConfig, SystemConfig, TrainConfig
    from fastafd.methods import Numerics, build_task
    from fastafd.optim import build_stages

    device = torch.device(spec["device"], 0) if spec["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if not spec["compile"]:  # the eager fp32 run compares bit for bit: no nondeterministic kernels
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            torch.use_deterministic_algorithms(True, warn_only=True)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=300))
    world = tdist.get_world_size()
    cfg = TrainConfig(model=ModelConfig(peers=tuple(spec["peers"]), num_classes=100), method=MethodConfig(name="afd"),
                      data=DataConfig(format="synthetic", batch_size=spec["batch"], image_size=spec["image_size"]), loop=LoopConfig(epochs=1),
                      system=SystemConfig(device=spec["device"], precision=spec["precision"], compile="on" if spec["compile"] else "off",
                                          channels_last="auto"))
    dtype, channels_last, compile_ = dist.resolve_numerics(cfg.system, device)

    def build(overlap: bool):
        torch.manual_seed(0)
        task = build_task(cfg, 100, Numerics(device.type, dtype), device, channels_last)
        if compile_:
            task.compile()
        sync = make_grad_sync(world, overlap=overlap, bucket_mb=spec["bucket_mb"], compression="none")  # small buckets: several per stage
        stages = build_stages(task, cfg, device=device, dtype=dtype, steps_per_epoch=1000, grad_sync=sync)
        stages.set_step(0)
        task.train()
        return task, stages, sync

    per_rank = spec["batch"] // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(per_rank, 3, spec["image_size"], spec["image_size"], generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (per_rank,), generator=g).to(device)
    runs = {"coalesced": build(False), "overlapped": build(True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    first: dict[str, float] = {}

    def window(name: str, steps: int) -> float:
        task, stages, _ = runs[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        tdist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            with stages.iteration():
                task.train_step(x, y, stages)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tdist.barrier()
        return (time.perf_counter() - start) / steps

    for name in runs:
        first[name] = window(name, 1)  # compile happens here
        if spec["warmup"] > 1:
            window(name, spec["warmup"] - 1)
    for _ in range(spec["repeats"]):
        for name in runs:
            times[name].append(window(name, spec["steps"]))
    states = {name: {k: v.detach().float().cpu() for k, v in runs[name][0].state_dict().items() if v.is_floating_point()} for name in runs}
    max_diff = max((states["overlapped"][k] - states["coalesced"][k]).abs().max().item() for k in states["coalesced"])
    scale = max(v.abs().max().item() for v in states["coalesced"].values())
    finite = all(torch.isfinite(v).all().item() for s in states.values() for v in s.values())
    # parameters only across ranks: BatchNorm running statistics follow each rank's own batches
    checksum = torch.tensor([sum(p.detach().double().sum().item() for p in runs[n][0].parameters()) for n in runs], dtype=torch.float64)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    tdist.all_gather(gathered, checksum)
    tolerance = 1e-6 if not compile_ and dtype == torch.float32 else 2e-2
    sync = runs["overlapped"][2]
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        write_json(result, {
            "spec": spec, "backend": "gloo", "world_size": world, "device": str(device), "dtype": str(dtype), "channels_last": channels_last,
            "compile": compile_, "bucket_mb": spec["bucket_mb"], "seconds_per_iteration": times, "first_window_s": first, "median_s": med,
            "coalesced_over_overlapped": med["coalesced"] / med["overlapped"],
            "max_abs_diff_overlapped_vs_coalesced": max_diff, "largest_value": scale, "tolerance": tolerance,
            "states_equal": finite and max_diff <= tolerance * max(1.0, scale),
            "ranks_agree": all(torch.equal(gathered[0], t) for t in gathered[1:]), "finite": finite,
            "overlapped_launches": dict(getattr(sync, "launched", {})),
            "iterations_each": 1 + max(spec["warmup"] - 1, 0) + spec["repeats"] * spec["steps"],
        })
    tdist.barrier()
    tdist.destroy_process_group()


def data_markdown(records: dict, env: dict) -> str:
    lines = ["# fastafd data path and all-reduce on the GPU check", "", machine_line(env), ""]
    d = records.get("decode")
    if d is not None:
        lines += ["## JPEG decode + augmentation", ""]
        if d.get("status") == "ok":
            lines += [f"{d['images_per_epoch']} ImageNet-size JPEGs (mean {d['mean_file_kb']} KB), batch {d['batch']}, {d['size']} px, {d['device']}:", "",
                      "| pipeline | img/s median | epochs |", "| --- | ---: | --- |"]
            lines += [f"| {k} | {v:.0f} | {', '.join(f'{r:.0f}' for r in d['img_per_s'][k])} |" for k, v in d["img_per_s_median"].items()]
            lines += ["", f"Ratio (median): **{d['ratio_median']:.2f}x** ({d['ratio']}).", ""]
        else:
            lines += [f"{d['status']}: {d.get('reason', '')}", ""]
    for key, c in records.items():
        if not key.startswith("comm-"):
            continue
        lines += [f"## {key}: fastafd.comm overlapped vs coalesced, 2 processes, gloo", ""]
        if c.get("status") != "ok":
            lines += [f"{c['status']}: {c.get('reason', '')}", ""]
            continue
        s = c["spec"]
        lines += [f"AFD (sequential) on {' + '.join(s['peers'])}, {s['image_size']} px, global batch {s['batch']}, {c['device']}, {c['dtype']}, "
                  f"compile {c['compile']}, {c['bucket_mb']} MiB buckets, {c['iterations_each']} iterations each.", "",
                  f"- states equal (overlapped vs coalesced): **{c['states_equal']}** (max abs difference {c['max_abs_diff_overlapped_vs_coalesced']:.3g}, "
                  f"tolerance {c['tolerance']:g}); ranks' parameters agree: **{c['ranks_agree']}**; finite: {c['finite']}",
                  f"- bucket all-reduces started by hooks during backward / after it: {c['overlapped_launches']}",
                  f"- s/iteration (median): coalesced {c['median_s']['coalesced']:.4f}, overlapped {c['median_s']['overlapped']:.4f} "
                  f"({c['coalesced_over_overlapped']:.2f}x; two processes sharing one GPU over gloo: a plumbing check, not NCCL's speed)", ""]
    return "\n".join(lines)


def part_data(a: argparse.Namespace, clock: Clock) -> int:
    env = environment()
    write_json(a.out / "env.json", env)
    records: dict[str, dict] = {}
    bad = 0

    def save(key: str, file: str, rec: dict) -> None:
        records[key] = rec
        write_json(a.out / file, rec)
        write_file(a.out / "data.md", data_markdown(records, env))

    need = 10.0 if a.cpu_smoke else 60.0
    if clock.left() < need:
        save("decode", "data-decode.json", {"status": "skipped", "reason": f"deadline: {clock.left():.0f} s left, decode needs {need:.0f} s"})
    else:
        start = time.time()
        try:
            rec = {"status": "ok", **run_decode(a)}
        except Exception as e:  # noqa: BLE001 - one broken unit must not cost the others' results
            import traceback

            bad += 1
            rec = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        rec["seconds"] = round(time.time() - start, 1)
        save("decode", "data-decode.json", rec)
    for run in comm_runs(a.cpu_smoke):
        key = f"comm-{run['label']}"
        if clock.left() < run["need_s"]:
            rec = {"status": "skipped", "reason": f"deadline: {max(clock.left(), 0):.0f} s left, the run needs {run['need_s']:.0f} s", "spec": run}
        else:
            rec = run_comm(run, clock, 60.0 if a.cpu_smoke else a.variant_cap_s)
            bad += rec["status"] != "ok" or not rec.get("states_equal") or not rec.get("ranks_agree")
        save(key, f"{key}.json", rec)
    print(data_markdown(records, env))
    return 1 if bad else 0


# -- part 4: DALI (optional) -----------------------------------------------------------------------------


def part_dali(a: argparse.Namespace, clock: Clock) -> int:
    env = environment()
    write_json(a.out / "env.json", env)
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        write_json(a.out / "dali.json", {"status": "skipped", "reason": f"DALI is not importable ({e}): see benchmarks/GPU.md, part 4"})
        return 1
    rec: dict = {}
    if a.cpu_smoke or not _cuda():
        rec = {"status": "skipped", "reason": "DALI's mixed decode needs a CUDA device"}
    elif clock.left() > 60:
        import torch

        from fastafd.config import DataConfig
        from fastafd.data import build_data

        sys.path.insert(0, str(BENCH))
        from data import time_interleaved

        with tempfile.TemporaryDirectory(prefix="fastafd-gpucheck-dali-") as tmp:
            root = Path(tmp)
            _jpeg_folder(root, a.images)
            cfg = DataConfig(root=root, batch_size=256, image_size=224, num_threads=max(1, min(8, os.cpu_count() or 1)))
            train, _, _ = build_data(cfg, rank=0, world_size=1, local_rank=0, device=torch.device("cuda"), seed=0, channels_last=True,
                                     dtype=torch.bfloat16)

            def dali(epoch: int):
                train.set_epoch(epoch)
                yield from train
                torch.cuda.synchronize()

            makers = {"fastafd DALI pipeline, 'mixed' decode": dali}
            makers.update({k: v for k, v in decode_makers(root, 256, 224, "cuda", 0).items() if "decode_jpeg" in k})
            times, n = time_interleaved(makers, repeats=3)
        rates = {k: [n / s for s in v] for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in rates.items()}
        dali_name, tv = list(med)
        rec = {"status": "ok", "images_per_epoch": n, "img_per_s": rates, "img_per_s_median": med, "ratio_median": med[dali_name] / med[tv],
               "ratio": f"{dali_name} / {tv}"}
    else:
        rec = {"status": "skipped", "reason": f"deadline: {clock.left():.0f} s left"}
    write_json(a.out / "dali.json", rec)
    t = run_tests(a.out, clock, name="dali-tests", select=["-k", "dali or host_syncs"], test_timeout_s=a.test_timeout_s)
    write_file(a.out / "dali.md", f"# DALI on the GPU check\n\n{machine_line(env)}\n\n```\n{json.dumps(rec, indent=1)}\n```\n\n"
               + tests_markdown(t, "DALI GPU tests"))
    return 0 if rec.get("status") != "failed" and not t["counts"]["failed"] and not t["counts"]["error"] else 1


# -- report ------------------------------------------------------------------------------------------------


def machine_line(env: dict) -> str:
    gpu = env.get("nvidia_smi") or env.get("gpu") or "no CUDA device"
    return (f"Machine: {gpu}; {env.get('cpus')} CPUs; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), torchvision "
            f"{env.get('torchvision')}, timm {env.get('timm')}, accelerate {env.get('accelerate')}, tyro {env.get('tyro')}, "
            f"DALI {env.get('nvidia.dali')}, Python {env['python']}.")


def report(out: Path, folders: list[Path], command_note: str) -> Path:
    """One Markdown page (and the raw files) from the folders the device calls brought back."""
    from fastafd.run.env import git_sha

    out.mkdir(parents=True, exist_ok=True)
    sha = git_sha()
    parts = ["# fastafd GPU check", "", f"Checkout sent: git {sha} (the HEAD here when this report was made). {command_note}".strip(), ""]
    env = None
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                (out / f"{folder.name}-{f.name}").write_bytes(f.read_bytes())
        if (folder / "env.json").is_file() and env is None:
            env = json.loads((folder / "env.json").read_text())
            parts += [machine_line(env), ""]
        if (folder / "tests.jsonl").is_file():
            parts.append(tests_markdown(summarize_tests(folder / "tests.jsonl")))
        steps = [json.loads(f.read_text()) for f in sorted(folder.glob("step-*.json"))]
        if steps:
            order = {(tuple(p), v): i for i, (p, v) in enumerate(STEP_PLAN)}
            steps.sort(key=lambda r: order.get((tuple(r["peers"]), r["variant"]), 99))
            parts.append(step_markdown(steps, steps[0]["env"]).split("\n", 4)[-1])
        data = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("comm-*.json"))}
        if (folder / "data-decode.json").is_file():
            data = {"decode": json.loads((folder / "data-decode.json").read_text()), **data}
        if data:
            parts.append(data_markdown(data, env or {}).split("\n", 4)[-1])
        if (folder / "dali.md").is_file():
            parts.append((folder / "dali.md").read_text().split("\n", 4)[-1])
    page = out / "gpu_check.md"
    page.write_text("\n".join(parts) + "\n")
    return page


# -- the device calls (GPU.md) and the limits on what comes back --------------------------------------------

OUT_LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "total_bytes": 64 * 2**20, "folders_deep": 2}
"""What the device tool brings back from $OUT (its README): at most 8 files of 16 MiB, 64 MiB together,
no deeper than $OUT/a/b/file, names of letters, digits, '.', '_' and '-'."""
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
CALL_LIMITS = {"command_chars": 2000, "carry_paths": 8, "timeout_s": 600}


def device_calls(md: Path = BENCH / "GPU.md") -> list[dict]:
    """The calls written in GPU.md: each ``### Call N: part`` section's ``carry:`` (JSON list), ``timeout_s:``
    and its first ```` ```bash ```` block (the command text, one line)."""
    calls = []
    for section in re.split(r"^### ", md.read_text(), flags=re.M)[1:]:
        head = re.match(r"Call (\d+): (\w+)", section)
        if not head:
            continue
        carry = re.search(r"^carry: `(\[.*?\])`", section, flags=re.M)
        timeout = re.search(r"timeout_s: `?(\d+)", section)
        command = re.search(r"```bash\n(.*?)\n```", section, flags=re.S)
        calls.append({"call": int(head.group(1)), "part": head.group(2), "carry": json.loads(carry.group(1)) if carry else None,
                      "timeout_s": int(timeout.group(1)) if timeout else None, "command": command.group(1) if command else None})
    return calls


def check_out(folder: Path) -> list[str]:
    """What of ``folder`` would not come back from the device's $OUT (empty: all of it would)."""
    problems, files, total = [], [], 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not NAME_OK.match(path.name):
            problems.append(f"{rel}: name has characters other than letters, digits, '.', '_', '-'")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file")
        elif path.is_file():
            files.append(rel)
            size = path.stat().st_size
            total += size
            if size > OUT_LIMITS["file_bytes"]:
                problems.append(f"{rel}: {size / 2**20:.1f} MiB, over 16 MiB")
            if len(rel.parts) - 1 > OUT_LIMITS["folders_deep"]:
                problems.append(f"{rel}: deeper than two folders")
    if len(files) > OUT_LIMITS["files"]:
        problems.append(f"{len(files)} files, over {OUT_LIMITS['files']}: {', '.join(map(str, files))}")
    if total > OUT_LIMITS["total_bytes"]:
        problems.append(f"{total / 2**20:.1f} MiB in all, over 64 MiB")
    return problems


# -- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    for name in ("tests", "step", "data", "dali"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, required=True, help="folder for this part's files (the device's $OUT)")
        s.add_argument("--budget-s", type=float, default=450, help="the part's deadline, from the start of gpu_check.sh (the device's limit is 600 s)")
        s.add_argument("--test-timeout-s", type=float, default=180, help="bound of each GPU test (pytest-timeout), cut to the time left")
        s.add_argument("--variant-cap-s", type=float, default=300, help="most seconds one step variant or comm run may take")
        s.add_argument("--images", type=int, default=1024, help="JPEGs generated for the decode measurements")
        s.add_argument("--cpu-smoke", action="store_true", help="everything tiny on the CPU: checks the plumbing, measures nothing")
    r = sub.add_parser("report")
    r.add_argument("--out", type=Path, required=True, help="e.g. benchmarks/results/gpu-h200-2026-12-05")
    r.add_argument("--note", default="", help="the device calls as run (GPU.md), card and anything else to record")
    r.add_argument("folders", type=Path, nargs="+", help="the folders the device calls brought back")
    c = sub.add_parser("calls", help="print the device calls of GPU.md as JSON")
    c.add_argument("--md", type=Path, default=BENCH / "GPU.md")
    o = sub.add_parser("check-out", help="exit 1 if a folder would not come back whole from the device's $OUT")
    o.add_argument("folder", type=Path)
    w = sub.add_parser("_comm-worker")
    w.add_argument("--rank", type=int, required=True)
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--result", type=Path, required=True)
    w.add_argument("--spec", required=True)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if a.part == "_comm-worker":
        comm_worker(a.rank, a.port, a.result, json.loads(a.spec))
        return 0
    if a.part == "calls":
        print(json.dumps(device_calls(a.md), indent=1))
        return 0
    if a.part == "check-out":
        problems = check_out(a.folder)
        files = [f for f in a.folder.rglob("*") if f.is_file()]
        print(f"{a.folder}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.2f} MiB" + "".join(f"\n  {p}" for p in problems))
        return 1 if problems else 0
    if a.part == "report":
        print(report(a.out, a.folders, a.note))
        return 0
    clock = Clock(a.budget_s)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"[gpu_check] part {a.part}: {clock.left():.0f} s left of {a.budget_s:.0f} s", flush=True)
    if a.part != "tests" and not a.cpu_smoke and not _cuda():
        write_json(a.out / f"{a.part}-skipped.json", {"status": "skipped", "reason": "no CUDA device (use --cpu-smoke to run it tiny on the CPU)"})
        return 0
    return {"tests": part_tests, "step": part_step, "data": part_data, "dali": part_dali}[a.part](a, clock)


if __name__ == "__main__":
    sys.exit(main())
