"""`fastafd bench step` measures every variant in one run and writes its report."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastafd import cli

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train


def load_benchmark(filename: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(filename.removesuffix(".py"), Path(__file__).parents[2] / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_writes_all_variants(tmp_path, capsys):
    args = ["bench", "step", "--peers", "cifar_resnet8", "cifar_resnet8", "--image_size", "32", "--batch_size", "8",
            "--warmup", "1", "--steps", "1", "--repeats", "2", "--out", str(tmp_path), "--name", "t", "--count_flops"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "step-t.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["reference", "independent", "extra-backward", "afd-sequential", "afd-simultaneous"]
    assert all(r["img_per_s_median"] > 0 and len(r["windows"]) == 2 for r in report["results"])
    assert {"afd-sequential/reference", "cost afd-simultaneous vs independent", "cost extra-backward vs independent",
            "cost afd-simultaneous vs extra-backward"} <= set(report["ratios"])
    assert report["device"] == "cpu" and report["versions"]["torch"]
    flops = {r["variant"]: r["gflop_per_step"] for r in report["results"]}
    # one extra backward of the extractors costs less than a forward + backward; AFD adds discriminators on top
    assert 1 < report["ratios"]["FLOP extra-backward vs independent"] < 2
    assert flops["afd-sequential"] > flops["afd-simultaneous"] > flops["extra-backward"] > flops["independent"] > 0
    md = (tmp_path / "step-t.md").read_text()
    assert "| afd-simultaneous |" in md and "fastafd bench step" in md
    assert "| reference |" in capsys.readouterr().out


def test_bench_rejects_unknown_variant(capsys):
    assert cli.main(["bench", "step", "--variants", "afd-fast"]) == 2
    assert "unknown variant 'afd-fast'" in capsys.readouterr().err


def test_data_benchmark_times_every_pipeline_on_the_same_epochs(tmp_path):
    bench = load_benchmark("data.py")
    assert bench.main(["--images", "64", "--batch", "8", "--size", "32", "--threads", "1", "--repeats", "2",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "data.json").read_text())
    assert set(report["runs"]) == {bench.FAST, bench.FAST_CL, bench.DALI_RESIZE, bench.TORCHVISION}
    assert all(len(r["epoch_s"]) == 2 and r["images_per_epoch"] == 64 for r in report["runs"].values())
    assert report["ratio_median"] == report["runs"][bench.FAST]["img_per_s_median"] / report["runs"][bench.TORCHVISION]["img_per_s_median"]
    assert "| torchvision ImageFolder + DataLoader |" in (tmp_path / "data.md").read_text()


def test_optimizer_benchmark_times_each_implementation(tmp_path):
    bench = load_benchmark("optimizers.py")
    assert bench.main(["--peers", "resnet10t", "--steps", "1", "--repeats", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "optimizers.json").read_text())
    assert [(r["optimizer"], r["impl"]) for r in report["rows"]] == [
        (o, i) for o in ("SGD", "Adam") for i in ("fused", "foreach", "for-loop")]
    assert all(r["ms_median"] > 0 and len(r["ms"]) == 2 for r in report["rows"])
    assert "| Adam | fused |" in (tmp_path / "optimizers.md").read_text()


def test_gpu_check_runs_end_to_end_on_cpu_with_its_gpu_parts_skipped(tmp_path):
    root = Path(__file__).parents[2]
    proc = subprocess.run(["bash", str(root / "benchmarks/gpu_check.sh"), str(tmp_path), "--cpu-smoke"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    if not torch.cuda.is_available():
        assert report["tests"]["counts"]["passed"] == 0 and report["tests"]["counts"]["skipped"] >= 18
        assert report["data"] == {"skipped": "no CUDA device"}
    (run,) = report["step"]["runs"]
    assert [r["variant"] for r in run["results"]] == ["reference", "independent", "afd-sequential"]
    assert run["targets"]["afd-sequential/reference"]["target"] == 2.5
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Training step" in md and "afd-sequential/reference" in md and (tmp_path / "gpu-tests.xml").is_file()


@pytest.mark.distributed
def test_comm_benchmark_times_both_syncs_and_models_the_fabrics(tmp_path):
    comm = load_benchmark("comm.py")
    assert comm.main(["--processes", "2", "--peers", "cifar_resnet8", "cifar_resnet8", "--warmup", "1", "--steps", "1",
                      "--repeats", "2", "--model-world-sizes", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "comm.json").read_text())
    (m,) = report["measured"]
    assert m["processes"] == 2 and set(m["median_s"]) == {"coalesced", "overlapped"} and m["overlapped_speedup"] > 0
    rows = report["model"]["rows"]
    assert {r["fabric"] for r in rows} == set(comm.BANDWIDTHS_GBPS) and all(r["overlap_best_ms"] <= r["no_overlap_ms"] for r in rows)
    total = sum(report["model"]["stage_bytes"].values())
    nvlink = next(r for r in rows if r["busbw_GBps"] == 450.0 and r["wire"] == "fp32")
    assert nvlink["no_overlap_ms"] == pytest.approx(2 * 7 / 8 * total / 450e9 * 1e3)  # the ring formula
    assert "| 2 |" in (tmp_path / "comm.md").read_text()


def test_bench_step_with_a_cnn_vit_pair_counts_flops(tmp_path):
    args = ["bench", "step", "--peers", "cifar_resnet8", "deit_tiny_patch16_224", "--image_size", "32", "--batch_size", "4",
            "--variants", "reference", "extra-backward", "afd-sequential", "--warmup", "1", "--steps", "1", "--repeats", "1",
            "--out", str(tmp_path), "--name", "vit", "--count_flops"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "step-vit.json").read_text())
    assert all(r["gflop_per_step"] > 0 and r["img_per_s_median"] > 0 for r in report["results"])
