"""Observability end to end through the real `fastafd` CLI: TensorBoard tags, profiler trace, progress, plots."""

import gzip
import json

import pytest

from fastafd.run import rundir

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train

PEERS = ["peer0-cifar_resnet8", "peer1-cifar_resnet8"]
STEPS_PER_EPOCH, EPOCHS, LOG_INTERVAL = 6, 2, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory, fastafd_cli):
    out = tmp_path_factory.mktemp("runs") / "tiny-afd"
    env = fastafd_cli.env(tmp_path_factory.mktemp("cache"))
    proc = fastafd_cli.run([
        "train", "--out", str(out), "--model.peers", "cifar_resnet8", "cifar_resnet8",
        "--data.format", "synthetic", "--data.synthetic_classes", "10", "--data.image_size", "32",
        "--data.batch_size", "16", "--data.synthetic_samples", "256",
        "--loop.epochs", str(EPOCHS), "--loop.max_steps_per_epoch", str(STEPS_PER_EPOCH), "--loop.log_interval", str(LOG_INTERVAL),
        "--profile", "2", "5",
    ], env, timeout=300)
    return out, env, proc


def test_tensorboard_event_files_hold_the_listed_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {f"train/{m}/{p}" for m in ("ce", "kl", "g_loss", "d_loss", "d_real", "d_fake") for p in PEERS}
    expected |= {f"val/{m}/{p}" for m in ("top1", "top5", "d_real", "d_fake") for p in PEERS}
    expected |= {"val/top1/ensemble", "val/top5/ensemble", "lr/logit", "lr/disc", "lr/feat", "perf/img_per_s", "perf/data_wait_frac"}
    assert expected <= tags, sorted(expected - tags)
    # one training point per log interval, at the global step; validation after each epoch
    total = EPOCHS * STEPS_PER_EPOCH
    assert [e.step for e in acc.Scalars("train/ce/peer0-cifar_resnet8")] == list(range(LOG_INTERVAL, total + 1, LOG_INTERVAL))
    assert [e.step for e in acc.Scalars("val/top1/ensemble")] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    assert all(e.value > 0 for e in acc.Scalars("perf/img_per_s"))
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("perf/data_wait_frac"))
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("train/d_real/peer1-cifar_resnet8"))
    assert acc.Scalars("lr/disc")[0].value == pytest.approx(json.loads((out / "config.json").read_text())["adv_optim"]["lr"])
    # values match what metrics.jsonl recorded for the same evaluation
    last = rundir.read_metrics(out)[-1]
    assert acc.Scalars("val/top1/peer1-cifar_resnet8")[-1].value == pytest.approx(last["peers"][1]["top1"], abs=1e-4)
    assert 0.0 <= last["data_wait_frac"] <= 1.0


def test_profile_writes_a_trace_with_the_stage_ranges_that_parses(run, tmp_path):
    out, _, proc = run
    assert "gpuGetDeviceCount" not in proc.stderr and "USDT:" not in proc.stderr  # Kineto's CPU-only chatter
    traces = sorted((out / "profile").glob("rank0.*.pt.trace.json.gz"))
    assert len(traces) == 1, list((out / "profile").iterdir())
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"data", "train_step", "logit_step", "disc_step", "feat_step"} <= names
    assert sorted(n for n in names if n and n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"]
    # the PyTorch profiler plugin of TensorBoard (torch-tb-profiler) loads it the way its RunLoader does
    from torch_tb_profiler.profiler.data import RunProfileData
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    data = RunProfileData.parse("rank0", None, str(traces[0]), str(tmp_path))
    assert data.steps_names == ["2", "3", "4"]
    assert RunGenerator("rank0", None, data).generate_run_profile() is not None


def test_console_shows_progress_lines_and_one_summary_per_epoch(run):
    _, _, proc = run
    lines = proc.stdout.splitlines()
    progress = [line for line in lines if line.startswith("epoch 1/2 step ")]
    assert len(progress) == STEPS_PER_EPOCH // LOG_INTERVAL
    assert all("img/s" in line and "ETA" in line and "ce " in line and "g_loss " in line and "data " in line for line in progress)
    summaries = [line for line in lines if line.startswith(("epoch 1/2  top-1:", "epoch 2/2  top-1:"))]
    assert len(summaries) == 2 and all("ensemble" in s and "D(real)/D(fake)" in s for s in summaries)
    (eta,) = [line for line in lines if line.startswith("expected time: ")]  # once, up front
    assert lines.index(eta) < lines.index(progress[1]) and "per epoch x 2 epochs) at the " in eta


def test_plot_command_writes_the_pngs(run, tmp_path, fastafd_cli):
    out, env, _ = run
    proc = fastafd_cli.run(["plot", out, out, "--out", tmp_path / "plots"], env, timeout=300)
    written = {line.rsplit("/", 1)[-1] for line in proc.stdout.split()}
    assert written == {"top1.png", "losses.png", "discriminator.png", "throughput.png"}
    for name in written:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
