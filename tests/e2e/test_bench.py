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
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_step_writes_all_variants(tmp_path, capsys):
    args = ["bench", "step", "--peers", "cifar_resnet8", "cifar_resnet8", "--image_size", "32", "--batch_size", "8",
            "--warmup", "1", "--steps", "1", "--repeats", "2", "--out", str(tmp_path), "--name", "t", "--count_flops"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "step-t.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["reference", "independent", "extra-backward", "afd-sequential", "afd-simultaneous",
                                                         "one", "cl"]
    assert all(r["img_per_s_median"] > 0 and len(r["windows"]) == 2 for r in report["results"])
    assert {"afd-sequential/reference", "cost afd-simultaneous vs independent", "cost extra-backward vs independent",
            "cost afd-simultaneous vs extra-backward"} <= set(report["ratios"])
    assert report["device"] == "cpu" and report["versions"]["torch"]
    flops = {r["variant"]: r["gflop_per_step"] for r in report["results"]}
    # one extra backward of the extractors costs less than a forward + backward; AFD adds discriminators on top
    assert 1 < report["ratios"]["FLOP extra-backward vs independent"] < 2
    assert flops["afd-sequential"] > flops["afd-simultaneous"] > flops["extra-backward"] > flops["independent"] > 0
    # ONE and CL: two branches on one shared trunk (ResNet-8's first two of three stages) compute less than two networks
    assert 0.5 < report["ratios"]["FLOP one vs independent"] < 0.9 and 0.5 < report["ratios"]["FLOP cl vs independent"] < 0.9
    assert {"cost one vs independent", "cost cl vs independent"} <= set(report["ratios"])
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


def test_peers_benchmark_runs_every_tool_interleaved_and_reports_ratios_and_accuracy(tmp_path):
    # CI installs only .[dev]: the peers (torchdistill; timm's pinned version) come with .[bench]
    pytest.importorskip("torchdistill", reason="benchmarks/peers.py compares with torchdistill: pip install -e '.[bench]'")
    bench = load_benchmark("peers.py")
    assert bench.main(["--images", "48", "--val-images", "16", "--peers", "resnet10t", "resnet10t", "--size", "32", "--batch", "8",
                       "--warmup", "1", "--steps", "2", "--repeats", "2", "--workers", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "peers.json").read_text())
    assert [list(run) for run in report["runs"]] == [
        ["fastafd-independent", "timm-peer0", "timm-peer1", "fastafd-dml", "torchdistill-dml", "fastafd-afd", "reference-afd"],
        ["timm-peer0", "timm-peer1", "fastafd-independent", "torchdistill-dml", "fastafd-dml", "reference-afd", "fastafd-afd"],
    ]  # fastafd first, then last: the tools' windows interleave
    for run in report["runs"]:
        for tool, r in run.items():
            assert r["img_per_s"] > 0 and r["timed_images"] == 16 and len(r["load_1min"]) == 2
            assert len(r["top1"]) == (1 if tool.startswith("timm") else 2) and all(0 <= a <= 100 for a in r["top1"])
    first = report["runs"][0]
    timm_pair = 16 / (first["timm-peer0"]["window_s"] + first["timm-peer1"]["window_s"])
    independent = report["summary"]["ratios"]["independent"]
    assert independent["ratio"]["values"][0] == pytest.approx(first["fastafd-independent"]["img_per_s"] / timm_pair)
    assert set(report["summary"]["ratios"]) == {"independent", "dml", "afd"}
    assert report["versions"]["torchdistill"] and report["versions"]["timm"] and report["load_average_1min"]["before"] >= 0
    md = (tmp_path / "peers.md").read_text()
    assert "| dml |" in md and "| torchdistill-dml |" in md and "## Not compared" in md and "AFD in torchdistill" in md


def test_peers_torchdistill_config_trains_both_peers_with_the_dml_loss(tmp_path):
    """The config loads, trains the teacher, and its loss is fastafd's dml loss: CE of both peers + T^2 KL
    each way with the other peer detached (same value, same gradients)."""
    pytest.importorskip("torchdistill", reason="benchmarks/peers.py compares with torchdistill: pip install -e '.[bench]'")
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies
    from torchdistill.losses.registry import get_high_level_loss

    from fastafd.losses import cross_entropy, kl_to_teacher

    bench = load_benchmark("peers.py")
    for split in ("train", "val"):
        (tmp_path / "data" / split / "c0").mkdir(parents=True)
        (tmp_path / "data" / split / "c0" / "a.JPEG").touch()  # ImageFolder lists files, it opens them only when read
    s = bench.Settings(root=str(tmp_path / "data"), peers=("resnet10t", "resnet10t"), image_size=32, batch=4, warmup=1, steps=1,
                       workers=0, seed=0, lr=0.1, momentum=0.9, weight_decay=1e-4, temperature=3.0, adam_lr=2e-5,
                       adam_weight_decay=0.1, num_classes=5)
    (tmp_path / "dml.yaml").write_text(bench.torchdistill_config_text(s))
    config = yaml_util.load_yaml_file(str(tmp_path / "dml.yaml"))
    sys.path.insert(0, str(bench.CONFIGS))
    try:
        import_dependencies(config["dependencies"])  # registers MutualKLLoss and timm_model, as the benchmark's worker does
    finally:
        sys.path.remove(str(bench.CONFIGS))
    assert config["train"]["teacher"]["requires_grad"] is True and config["train"]["optimizer"]["kwargs"]["lr"] == 0.1
    loss = get_high_level_loss(config["train"]["criterion"])
    torch.manual_seed(0)
    teacher, student = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    got = loss({"teacher": {".": {"output": teacher}}, "student": {".": {"output": student}}}, {}, y)
    logits = torch.stack([teacher, student])
    want = (cross_entropy(logits, y) + kl_to_teacher(logits, torch.tensor([1, 0]), 3.0)).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(got, [teacher, student]), torch.autograd.grad(want, [teacher, student])):
        assert torch.allclose(a, b, atol=1e-6)


def test_optimizer_benchmark_times_each_implementation(tmp_path):
    bench = load_benchmark("optimizers.py")
    assert bench.main(["--peers", "resnet10t", "--steps", "1", "--repeats", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "optimizers.json").read_text())
    assert [(r["optimizer"], r["impl"]) for r in report["rows"]] == [
        (o, i) for o in ("SGD", "Adam") for i in ("fused", "foreach", "for-loop")]
    assert all(r["ms_median"] > 0 and len(r["ms"]) == 2 for r in report["rows"])
    assert "| Adam | fused |" in (tmp_path / "optimizers.md").read_text()


def _gpu_check_part(part: str, out: Path) -> None:
    root = Path(__file__).parents[2]
    proc = subprocess.run(["bash", str(root / "benchmarks/gpu_check.sh"), part, str(out), "--cpu-smoke"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert load_benchmark("gpu_check.py").check_out(out) == []  # all of it would come back from the device's $OUT


def test_gpu_check_tests_and_step_parts_run_end_to_end_on_cpu(tmp_path):
    gc = load_benchmark("gpu_check.py")
    _gpu_check_part("tests", tmp_path / "tests")
    assert sorted(p.name for p in (tmp_path / "tests").iterdir()) == ["env.json", "tests.jsonl", "tests.log", "tests.md"]
    summary = gc.summarize_tests(tmp_path / "tests" / "tests.jsonl")
    assert summary["pytest_exitstatus"] == 0 and not summary["not_finished"] and len(summary["cases"]) >= 18
    if not torch.cuda.is_available():
        assert summary["counts"]["skipped"] == len(summary["cases"]) and summary["cases"][0]["message"] == "needs a CUDA GPU"
    assert "| test_bench_step_on_cuda |" in (tmp_path / "tests" / "tests.md").read_text()
    _gpu_check_part("step", tmp_path / "step")
    records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "step").glob("step-*.json")}
    stem = "step-cifar_resnet8_cifar_resnet8-"
    assert set(records) == {f"{stem}{v}.json" for v in ("reference", "afd-sequential", "independent")}
    assert all(r["status"] == "ok" and r["result"]["img_per_s_median"] > 0 for r in records.values())
    assert records[f"{stem}afd-sequential.json"]["targets"]["afd-sequential/reference"]["target"] == 2.5
    md = (tmp_path / "step" / "step.md").read_text()
    assert "| afd-sequential |" in md and "afd-sequential/reference" in md
    page = gc.report(tmp_path / "results", [tmp_path / "tests", tmp_path / "step"], "calls 1-2 of GPU.md").read_text()
    assert "Machine: " in page and "## GPU tests: " in page and "## cifar_resnet8 + cifar_resnet8, 32 px" in page
    assert (tmp_path / "results" / "step-step.md").is_file() and (tmp_path / "results" / "tests-tests.jsonl").is_file()


@pytest.mark.distributed
def test_gpu_check_data_part_compares_the_overlapped_all_reduce_with_the_coalesced_one_on_cpu(tmp_path):
    _gpu_check_part("data", tmp_path)
    decode = json.loads((tmp_path / "data-decode.json").read_text())
    assert decode["status"] == "ok" and decode["images_per_epoch"] == 16 and decode["ratio_median"] > 0
    comm = json.loads((tmp_path / "comm-smoke-eager-fp32.json").read_text())
    assert comm["status"] == "ok" and comm["states_equal"] and comm["ranks_agree"] and comm["finite"]
    assert comm["overlapped_launches"]["during_backward"] > 0  # the hooks started buckets while backward ran
    assert "states equal (overlapped vs coalesced): **True**" in (tmp_path / "data.md").read_text()


@pytest.mark.distributed
def test_comm_benchmark_times_both_syncs_and_models_the_fabrics(tmp_path):
    comm = load_benchmark("comm.py")
    groups = ["eager:afd:sequential", "eager:ddp:independent"]  # the compiled groups compile every peer in every process: too slow here
    assert comm.main(["--processes", "2", "--peers", "cifar_resnet8", "cifar_resnet8", "--warmup", "1", "--steps", "1",
                      "--repeats", "2", "--groups", *groups, "--profile", "eager:afd:sequential",
                      "--model-world-sizes", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "comm.json").read_text())
    (m,) = report["measured"]
    assert m["processes"] == 2 and [g["group"] for g in m["groups"]] == groups
    afd, ddp = m["groups"]
    assert set(afd["median_s"]) == {"coalesced", "overlapped"} and set(ddp["median_s"]) == {"ddp", "fastafd"}
    assert all(len(v) == 2 for g in m["groups"] for v in g["seconds_per_iteration"].values())  # one time per window
    assert afd["ratio"] == pytest.approx(afd["median_s"]["coalesced"] / afd["median_s"]["overlapped"])
    assert m["profile"]["group"] == "eager:afd:sequential" and set(m["profile"]["exposed_ms"]) == {"coalesced", "overlapped"}
    assert all(v > 0 for v in m["profile"]["exposed_ms"].values())  # the sync's range was found in the trace
    rows = report["model"]["rows"]
    assert {r["fabric"] for r in rows} == set(comm.BANDWIDTHS_GBPS) and all(r["overlap_best_ms"] <= r["no_overlap_ms"] for r in rows)
    total = sum(report["model"]["stage_bytes"].values())
    nvlink = next(r for r in rows if r["busbw_GBps"] == 450.0 and r["wire"] == "fp32")
    assert nvlink["no_overlap_ms"] == pytest.approx(2 * 7 / 8 * total / 450e9 * 1e3)  # the ring formula
    text = (tmp_path / "comm.md").read_text()
    assert "| sequential | 2 | eager |" in text and "| independent | 2 | eager |" in text


def test_bench_step_with_a_cnn_vit_pair_counts_flops(tmp_path):
    args = ["bench", "step", "--peers", "cifar_resnet8", "deit_tiny_patch16_224", "--image_size", "32", "--batch_size", "4",
            "--variants", "reference", "extra-backward", "afd-sequential", "--warmup", "1", "--steps", "1", "--repeats", "1",
            "--out", str(tmp_path), "--name", "vit", "--count_flops"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "step-vit.json").read_text())
    assert all(r["gflop_per_step"] > 0 and r["img_per_s_median"] > 0 for r in report["results"])
