"""Faults from outside: SIGTERM (scancel, Kubernetes, container runtimes, torchrun stopping its workers)
and user errors under the multi-process launcher. Each ends with one line and a meaningful exit code,
and a stop leaves a checkpoint the same command resumes from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastafd.checkpoint import paths
from fastafd.run import rundir

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ["--model.peers", "cifar_resnet8", "cifar_resnet8", "--data.format", "synthetic", "--data.image_size", "32",
             "--data.synthetic_classes", "10", "--data.batch_size", "16", "--log.tensorboard", "off", "--log.progress", "lines",
             "--checkpoint.every_steps", "0"]
STOP_BOUND_S = 60
"""From SIGTERM to exit: one step (or one log interval), the checkpoint write and the interpreter's exit."""


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _stopped_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("fastafd: ") and not line.startswith("fastafd: warning:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_sigterm_checkpoints_at_the_next_step_exits_143_and_the_same_command_resumes(tmp_path, fastafd_cli):
    out = tmp_path / "run"
    cmd = ["train", "--out", str(out), *SYNTHETIC, "--data.synthetic_samples", "4096", "--loop.epochs", "1", "--loop.log_interval", "1000"]
    env = fastafd_cli.env(tmp_path / "cache", OMP_NUM_THREADS=1)
    proc = fastafd_cli.popen(cmd, env)
    _wait_for(out / "startup.jsonl", proc)  # the first step is done
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=STOP_BOUND_S)
    assert time.monotonic() - sent < STOP_BOUND_S
    assert proc.returncode == 143, err[-3000:]
    line = _stopped_line(err)
    assert line.startswith("fastafd: stopped at step ") and line.endswith(" on SIGTERM: checkpoint written; run the same command to resume")
    step = int(line.split("stopped at step ")[1].split()[0])
    assert step < 256  # stopped mid-epoch, at a step boundary: not at the end
    (ckpt,) = paths.list_checkpoints(out)
    assert ckpt == paths.step_dir(out, step)
    resumed = fastafd_cli.run(cmd, env, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt} at epoch 1, step {step}" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in rundir.read_metrics(out)] == [256]


@pytest.fixture
def launch(fastafd_cli, free_port):
    """``launch(tmp_path, *args, **knobs)``: launch/run.sh with ``knobs`` in its environment, in a session of its own."""
    return lambda tmp_path, *args, **knobs: _launch(fastafd_cli.env(tmp_path / "cache", OMP_NUM_THREADS=1, CPU=1, MASTER_PORT=free_port(), **knobs), *args)


def _launch(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(ROOT / "launch/run.sh"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.distributed
def test_a_user_error_under_the_launcher_is_one_line_from_rank_0_with_the_single_process_exit_code(tmp_path, launch):
    proc = launch(tmp_path, *SYNTHETIC, "--data.batch_size", "15", "--out", str(tmp_path / "run"), NPROC=2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["fastafd: error: data.batch_size=15 is not divisible by the 2 processes: use a multiple of 2, e.g. 14"], err[-3000:]
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path, launch):
    out = tmp_path / "run"
    proc = launch(tmp_path, *SYNTHETIC, "--data.synthetic_samples", "8192", "--loop.epochs", "1", "--loop.log_interval", "2",
                   "--out", str(out), NPROC=2)
    _wait_for(out / "startup.jsonl", proc)
    os.killpg(proc.pid, signal.SIGTERM)  # what scancel does: the launcher and its workers
    sent = time.monotonic()
    _, err = proc.communicate(timeout=STOP_BOUND_S)
    assert time.monotonic() - sent < STOP_BOUND_S
    assert proc.returncode == 143, err[-3000:]
    line = _stopped_line(err)
    assert " on SIGTERM: checkpoint written; run the same command to resume" in line
    step = int(line.split("stopped at step ")[1].split()[0])
    (ckpt,) = paths.list_checkpoints(out)
    assert ckpt == paths.step_dir(out, step) and step % 2 == 0  # a log point: where the ranks agree
    state = json.loads((ckpt / paths.STATE).read_text())
    assert len(state["ranks"]) == 2
