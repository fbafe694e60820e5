"""The one-shot GPU check: fastafd's CUDA tests, training-step throughput and GPU decode, in one command.

Made for a CUDA machine without internet (the project's H200 has torch, timm and accelerate but no DALI):
run it once, under 8 minutes, and commit what it writes. Sections, each recorded even when another fails:

1. ``environment``: card, driver, memory, CUDA/cuDNN/torch/timm/DALI versions, Python.
2. ``tests``: ``pytest -m gpu tests/gpu`` (junit XML parsed into pass/fail/skip per test).
3. ``step``: ``fastafd bench step`` at 224 px, batch 256: a ResNet-18 pair (reference, independent,
   afd sequential, afd simultaneous) and ResNet-18 + ResNet-50 (reference, independent, afd
   sequential); img/s medians and the ratios to the reference measured in the same run, reported
   against the targets (afd sequential >= 2.5x the reference; independent ResNet-18 pair >= 4,500 img/s).
4. ``data``: GPU JPEG decode of generated ImageNet-size JPEGs: fastafd's DALI training pipeline
   ("mixed" decode) when DALI is importable, else ``torchvision.io.decode_jpeg(device="cuda")``
   (batched) plus the crop/flip/normalize in torch.

Without CUDA the GPU sections are recorded as skipped (``--cpu-smoke`` runs the step section at a
tiny size on the CPU instead, which is how the tests check this script). Writes ``gpu_check.json``,
``gpu_check.md`` and ``gpu-tests.xml`` to ``--out``.

    bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
    python benchmarks/gpu_check.py --out /tmp/gc --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP = 2.5
"""afd sequential (the fast path at the paper's order) over the plain reference, same run."""
TARGET_INDEPENDENT = 4500.0
"""img/s of ``independent`` for a ResNet-18 pair at 224 px, batch 256, on one H100/H200."""


def environment() -> dict:
    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                  "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for name in ("timm", "accelerate", "torchvision", "tyro", "safetensors", "nvidia.dali", "triton"):
        try:
            info[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            info[name] = f"not importable ({type(e).__name__})"
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


def run_tests(out: Path, timeout_s: float) -> dict:
    xml = out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "-o", "junit_family=xunit2", f"--timeout={int(timeout_s)}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    result: dict = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                    "tail": proc.stdout[-3000:] + proc.stderr[-2000:], "cases": []}
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = "failed" if tag in ("failure", "error") else "skipped"
                    message = (el.get("message") or el.text or "").strip().splitlines()[0][:300] if (el.get("message") or el.text) else ""
            result["cases"].append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    counts = {k: sum(c["outcome"] == k for c in result["cases"]) for k in ("passed", "failed", "skipped")}
    result["counts"] = counts
    return result


def step_runs(device: str, smoke: bool) -> list[tuple[tuple[str, ...], tuple[str, ...], dict]]:
    """(peers, variants, size arguments) of each step benchmark."""
    if smoke:
        tiny = dict(image_size=32, batch_size=8, warmup=1, steps=1, repeats=2)
        return [(("cifar_resnet8", "cifar_resnet8"), ("reference", "independent", "afd-sequential"), tiny)]
    full = dict(image_size=224, batch_size=256, warmup=8, steps=10, repeats=5)
    return [
        (("resnet18", "resnet18"), ("reference", "independent", "afd-sequential", "afd-simultaneous"), full),
        (("resnet18", "resnet50"), ("reference", "independent", "afd-sequential"), full),
    ]


def run_step(device: str, smoke: bool, deadline: float) -> dict:
    from fastafd.bench.step import StepBenchArgs
    from fastafd.bench.step import run as bench

    reports = []
    for peers, variants, size in step_runs(device, smoke):
        if time.monotonic() > deadline:
            reports.append({"peers": list(peers), "skipped": "time budget spent"})
            continue
        args = StepBenchArgs(peers=peers, variants=variants, device=device, out=Path(tempfile.gettempdir()), **size)
        report = bench(args)
        by = {r["variant"]: r["img_per_s_median"] for r in report["results"]}
        report["targets"] = {
            "afd-sequential/reference": {"value": by["afd-sequential"] / by["reference"], "target": TARGET_SPEEDUP},
        }
        if "afd-simultaneous" in by:
            report["targets"]["afd-simultaneous/reference"] = {"value": by["afd-simultaneous"] / by["reference"], "target": TARGET_SPEEDUP}
        if peers == ("resnet18", "resnet18"):
            report["targets"]["independent img/s"] = {"value": by["independent"], "target": TARGET_INDEPENDENT}
        for t in report["targets"].values():
            t["met"] = t["value"] >= t["target"]
        reports.append(report)
    return {"runs": reports}


def _jpeg_folder(root: Path, images: int) -> list[Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from data import make_folder  # benchmarks/data.py: ImageNet-size JPEGs

    make_folder(root, images, classes=4)
    return sorted((root / "train").rglob("*.JPEG"))


def run_data(images: int, batch: int, size: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastafd-gpucheck-") as tmp:
        root = Path(tmp)
        files = _jpeg_folder(root, images)
        mean_kb = statistics.mean(f.stat().st_size for f in files) / 1024
        try:
            import nvidia.dali  # noqa: F401
            rates, how = _dali_epochs(root, batch, size, repeats), "fastafd DALI training pipeline, 'mixed' decode (nvJPEG) + resize/flip/normalize on the GPU, bf16 channels-last out"
        except ImportError:
            rates, how = _torchvision_decode(files, batch, size, repeats), "torchvision.io.decode_jpeg(device='cuda') batched + resized crop/flip/normalize in torch (DALI not installed)"
    return {"pipeline": how, "images": len(files), "mean_file_kb": round(mean_kb, 1), "batch": batch, "size": size,
            "img_per_s_median": statistics.median(rates), "img_per_s_min": min(rates), "img_per_s_max": max(rates), "repeats": rates}


def _dali_epochs(root: Path, batch: int, size: int, repeats: int) -> list[float]:
    from fastafd.config import DataConfig
    from fastafd.data import build_data

    cfg = DataConfig(root=root, batch_size=batch, image_size=size, num_threads=max(1, min(8, os.cpu_count() or 1)))
    train, _, _ = build_data(cfg, rank=0, world_size=1, local_rank=0, device=torch.device("cuda"), seed=0, channels_last=True,
                             dtype=torch.bfloat16)
    rates = []
    for epoch in range(repeats + 1):  # the first epoch warms up (pipeline build, nvJPEG state)
        train.set_epoch(epoch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        n = sum(x.shape[0] for x, _ in train)
        torch.cuda.synchronize()
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    return rates


def _torchvision_decode(files: list[Path], batch: int, size: int, repeats: int) -> list[float]:
    import torchvision
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    datas = [torchvision.io.read_file(str(f)) for f in files]
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(3, 1, 1) * 255
    g = torch.Generator().manual_seed(0)

    def epoch() -> int:
        n = 0
        for i in range(0, len(datas) - batch + 1, batch):
            imgs = decode_jpeg(datas[i : i + batch], device="cuda")
            out = []
            for img in imgs:
                h, w = img.shape[-2:]
                ch, cw = int(h * (0.3 + 0.7 * torch.rand(1, generator=g).item())), int(w * (0.3 + 0.7 * torch.rand(1, generator=g).item()))
                crop = F.resized_crop(img, 0, 0, ch, cw, [size, size], antialias=True)
                if torch.rand(1, generator=g).item() < 0.5:
                    crop = crop.flip(-1)
                out.append(((crop.float() - mean) / std).to(torch.bfloat16))
            torch.stack(out).contiguous(memory_format=torch.channels_last)
            n += len(imgs)
        return n

    epoch()
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        n = epoch()
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return rates


def section(results: dict, name: str, fn: Callable[[], dict], save: Callable[[], None]) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - one broken section must not cost the others' results
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    results[name]["section_seconds"] = round(time.perf_counter() - start, 1)
    save()


def markdown(r: dict) -> str:
    env = r["environment"]
    gpu = env.get("nvidia_smi") or env.get("gpu") or "no CUDA device"
    lines = ["# fastafd GPU check", "", f"Command: `{r['command']}`; {r['date']}; git {r['git_sha']}.", "",
             f"Machine: {gpu}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), timm {env['timm']}, "
             f"accelerate {env['accelerate']}, DALI {env['nvidia.dali']}, Python {env['python']}.", ""]
    t = r.get("tests", {})
    if "counts" in t:
        c = t["counts"]
        lines += [f"## Tests: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped ({t['seconds']} s)", "",
                  f"`{t['command']}`", "", "| test | outcome | note |", "| --- | --- | --- |"]
        lines += [f"| {x['test'].split('.')[-1]} | {x['outcome']} | {x['message'].replace('|', '/')} |" for x in t["cases"]]
        lines.append("")
    elif t:
        lines += ["## Tests", "", f"error: {t.get('error', t.get('skipped'))}", ""]
    s = r.get("step", {})
    lines += ["## Training step", ""]
    for run in s.get("runs", []):
        if "skipped" in run:
            lines += [f"{' + '.join(run['peers'])}: skipped ({run['skipped']})", ""]
            continue
        a = run["args"]
        lines += [f"### {' + '.join(a['peers'])}, {a['image_size']} px, batch {a['batch_size']}, {run['device']}", "",
                  "| variant | img/s median | min | max | first step s (compile) |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {v['variant']} | {v['img_per_s_median']:.1f} | {v['img_per_s_min']:.1f} | {v['img_per_s_max']:.1f} | {v['first_step_s']:.1f} |"
                  for v in run["results"]]
        lines += ["", "| measure | value | target | met |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {k} | {v['value']:.2f} | {v['target']:g} | {'yes' if v['met'] else 'no'} |" for k, v in run["targets"].items()]
        lines.append("")
    if "error" in s or "skipped" in s:
        lines += [f"{s.get('error') or s.get('skipped')}", ""]
    d = r.get("data", {})
    lines += ["## GPU decode", ""]
    if "img_per_s_median" in d:
        lines += [f"{d['pipeline']}: **{d['img_per_s_median']:.0f} img/s** median (min {d['img_per_s_min']:.0f}, max {d['img_per_s_max']:.0f}) "
                  f"over {len(d['repeats'])} epochs of {d['images']} JPEGs (mean {d['mean_file_kb']:.0f} KB), batch {d['batch']}, {d['size']} px.", ""]
    else:
        lines += [f"{d.get('error') or d.get('skipped')}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, gpu-tests.xml")
    p.add_argument("--budget-s", type=float, default=460, help="stop starting new benchmark runs after this many seconds")
    p.add_argument("--tests-timeout-s", type=float, default=240, help="limit of the pytest run (and of each test)")
    p.add_argument("--cpu-smoke", action="store_true", help="without CUDA, run the step section tiny on the CPU (plumbing check)")
    p.add_argument("--images", type=int, default=1024, help="JPEGs generated for the decode section")
    a = p.parse_args(argv)
    started = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    from fastafd import rundir

    results: dict = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_sha": rundir.git_sha(), "environment": environment()}

    def save() -> None:
        (a.out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
        (a.out / "gpu_check.md").write_text(markdown(results))

    cuda = torch.cuda.is_available()
    save()
    section(results, "tests", lambda: run_tests(a.out, a.tests_timeout_s), save)
    if cuda or a.cpu_smoke:
        section(results, "step", lambda: run_step("cuda" if cuda else "cpu", smoke=not cuda, deadline=started + a.budget_s), save)
    else:
        results["step"] = {"skipped": "no CUDA device (use --cpu-smoke to run it tiny on the CPU)"}
    if cuda and time.monotonic() < started + a.budget_s:
        section(results, "data", lambda: run_data(a.images, batch=256, size=224, repeats=3), save)
    else:
        results["data"] = {"skipped": "no CUDA device" if not cuda else "time budget spent"}
    results["seconds"] = round(time.monotonic() - started, 1)
    save()
    print(markdown(results))
    failed = results["tests"].get("counts", {}).get("failed", 0) or any("error" in results[k] for k in ("tests", "step", "data"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
