"""launch/run.sh: the knobs, a dry run, a 2-process run, and a rank that dies mid-run (CPU, gloo)."""

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fastafd.run import rundir

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # the real CLI: subprocesses that train

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "launch/run.sh"
TINY = ["--model.peers", "cifar_resnet8", "cifar_resnet8", "--data.format", "synthetic", "--data.image_size", "32",
        "--data.batch_size", "16", "--data.synthetic_samples", "512", "--data.synthetic_classes", "10",
        "--loop.log_interval", "2", "--log.tensorboard", "off", "--log.progress", "lines"]
FAILURE_BOUND_S = 45
"""A surviving rank must exit this soon after its peer died (heartbeat check included)."""


@pytest.fixture
def env(fastafd_cli, free_port):
    """``env(tmp_path, **knobs)``: launch/run.sh's environment, without the caller's launcher knobs, with ``knobs``."""

    def make(tmp_path, **knobs) -> dict:
        unset = dict.fromkeys(("NNODES", "NODE_RANK", "NPROC", "GPUS_PER_NODE", "DRY_RUN", "PRINT_ONLY"))
        return fastafd_cli.env(tmp_path / "cache", **{**unset, "OMP_NUM_THREADS": 1, "CPU": 1, "MASTER_PORT": free_port(), **knobs})

    return make


def test_knobs_become_accelerate_launch_arguments(tmp_path, env):
    out = subprocess.run([str(RUN_SH), "--loop.epochs", "1"], env=env(tmp_path, PRINT_ONLY=1, NNODES=2, NODE_RANK=1, NPROC=4,
                         MASTER_ADDR="10.1.2.3", MASTER_PORT=31000, DRY_RUN=1), capture_output=True, text=True, check=True).stdout.split()
    after = lambda flag: out[out.index(flag) + 1]  # noqa: E731
    assert out[1:3] == ["-m", "fastafd.launch"] and "--multi_gpu" in out
    assert (after("--num_machines"), after("--num_processes"), after("--machine_rank")) == ("2", "8", "1")
    assert (after("--main_process_ip"), after("--main_process_port")) == ("10.1.2.3", "31000")
    train = out[out.index("fastafd.cli"):]
    assert train == ["fastafd.cli", "train", "--system.device", "cpu", "--loop.dry_run", "--loop.epochs", "1"]
    single = subprocess.run([str(RUN_SH), "--x"], env=env(tmp_path, PRINT_ONLY=1), capture_output=True, text=True, check=True).stdout.split()
    assert single[1:] == ["-m", "fastafd.cli", "train", "--system.device", "cpu", "--x"]
    bad = subprocess.run([str(RUN_SH)], env=env(tmp_path, NNODES=2, NODE_RANK=2), capture_output=True, text=True)
    assert bad.returncode == 2 and "NODE_RANK=2" in bad.stderr


def test_dry_run_builds_everything_on_two_processes_and_trains_nothing(tmp_path, env):
    out = tmp_path / "run"
    proc = subprocess.run([str(RUN_SH), *TINY, "--out", str(out)], env=env(tmp_path, NPROC=2, DRY_RUN=1),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "dry run" in text and "2 processes" in text, text[-2000:]
    assert text.count("dry run:") == 1  # rank 0 only
    assert not (out / rundir.METRICS_FILE).exists()


def test_two_processes_train_and_only_rank_0_writes(tmp_path, env):
    out = tmp_path / "run"
    proc = subprocess.run([str(RUN_SH), *TINY, "--loop.epochs", "2", "--loop.max_steps_per_epoch", "4", "--out", str(out)],
                          env=env(tmp_path, NPROC=2), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rundir.read_metrics(out)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 4), (2, 8)]  # one row per epoch: rank 1 wrote nothing
    assert json.loads((out / rundir.ENV_FILE).read_text())["world_size"] == 2
    assert proc.stdout.count("run directory:") == 1
    assert (proc.stdout + proc.stderr).count("epoch 2/2  top-1:") == 1
    # 16 images over 2 processes: BatchNorm sees 8 per process; said once, by rank 0
    assert proc.stderr.count("fastafd: warning: 8 images per process (16 over 2 processes): BatchNorm statistics are per process") == 1


def test_slow_one_sided_work_longer_than_the_process_group_timeout_does_not_stop_the_run(tmp_path, env):
    """Rank 0 scans the data and writes the checkpoint slower than --system.dist_timeout_s: rank 1 waits for
    it on the store (not in a collective that times out), says what it waits for, and the run ends well."""
    out = tmp_path / "run"
    proc = subprocess.run([str(RUN_SH), *TINY, "--loop.epochs", "1", "--loop.max_steps_per_epoch", "2", "--system.dist_timeout_s", "4",
                           "--out", str(out)],
                          env=env(tmp_path, NPROC=2, FASTAFD_FAULT="sleep@data=1,sleep@checkpoint=1", FASTAFD_FAULT_SLEEP_S=7,
                                  FASTAFD_WAIT_SAY_S=2),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in rundir.read_metrics(out)] == [2]
    assert "fastafd: rank 1: waiting for rank 0 to open the data (" in proc.stderr, proc.stderr[-3000:]
    assert "fastafd: rank 1: waiting for rank 0 to write the checkpoint of step 2 (" in proc.stderr, proc.stderr[-3000:]


def _two_nodes(env, port: int, tmp_path, fault: str, *extra: str) -> tuple[list[subprocess.Popen], list]:
    """Two nodes (one launcher each, as on a cluster); rank 1 gets ``FASTAFD_FAULT=fault``."""
    knobs = dict(NNODES=2, NPROC=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, FASTAFD_HEARTBEAT_S=1)
    args = [str(RUN_SH), *TINY, "--loop.epochs", "1", "--loop.max_steps_per_epoch", "400", "--data.synthetic_samples", "8192",
            "--system.dist_timeout_s", "600", "--out", str(tmp_path / "run"), *extra]
    logs = [open(tmp_path / f"node{r}.log", "w+") for r in range(2)]
    nodes = [subprocess.Popen(args, env={**env(tmp_path, NODE_RANK=r, **knobs), **({"FASTAFD_FAULT": fault} if r else {})},
                              stdout=logs[r], stderr=subprocess.STDOUT, start_new_session=True) for r in range(2)]
    return nodes, logs


def _wait_for_rank0(nodes, since: Callable[[], float | None], limit_s: float = 180) -> float:
    """Seconds from ``since()`` (the moment rank 1 failed) until rank 0's launcher exited."""
    failed = None
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and nodes[0].poll() is None:
        failed = failed or since()
        time.sleep(0.2)
    failed = failed or since()
    assert failed is not None, "rank 1 never reached its fault"
    assert nodes[0].poll() is not None, "rank 0 still running: it hangs on its peer"
    return time.monotonic() - failed


def _stop_all(nodes) -> None:
    """SIGKILL every launcher and every process below it (torchrun's workers are in their own process groups)."""
    for p in nodes:
        for pid in _process_tree(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


def test_a_dead_rank_makes_the_other_exit_promptly_naming_it(tmp_path, env, free_port):
    """Rank 1's process is killed after step 3: gloo's collective fails at once, rank 0 names rank 1."""
    nodes, logs = _two_nodes(env, free_port(), tmp_path, "kill@step=3")
    try:
        waited = _wait_for_rank0(nodes, lambda: time.monotonic() if nodes[1].poll() is not None else None)
    finally:
        _stop_all(nodes)
    text = [log.seek(0) or log.read() for log in logs]
    assert nodes[1].returncode != 0
    assert nodes[0].returncode != 0, text[0][-2000:]
    assert waited < FAILURE_BOUND_S, f"rank 0 took {waited:.0f} s to exit after rank 1 died"
    assert "rank 1 of 2 stopped" in text[0], text[0][-3000:]


HUNG_TIMEOUT_S = 8
HUNG_BOUND_S = HUNG_TIMEOUT_S + 12
"""A hung peer (SIGSTOP: alive, silent) is named within the peer timeout plus a few heartbeats (1 s here)."""


def test_a_hung_rank_makes_the_other_exit_within_the_peer_timeout_naming_it(tmp_path, env, free_port):
    """Rank 1 SIGSTOPs itself after step 3: its sockets stay open, so no collective fails (the NCCL case
    on any backend); rank 0's watchdog must see its heartbeat stop and exit with one line."""
    stopped_at: list[float] = []

    def rank1_stopped() -> float | None:
        if not stopped_at:
            state = _process_states(nodes[1].pid)
            if "T" in state:
                stopped_at.append(time.monotonic())
        return stopped_at[0] if stopped_at else None

    nodes, logs = _two_nodes(env, free_port(), tmp_path, "stop@step=3", "--system.peer_timeout_s", str(HUNG_TIMEOUT_S))
    try:
        waited = _wait_for_rank0(nodes, rank1_stopped)
    finally:
        _stop_all(nodes)
    text = logs[0].seek(0) or logs[0].read()
    assert nodes[0].returncode != 0, text[-2000:]
    assert waited < HUNG_BOUND_S, f"rank 0 took {waited:.0f} s to exit after rank 1 hung"
    assert "fastafd: error: rank 0: rank 1 of 2 stopped (process died or hung, or node lost); no heartbeat for" in text, text[-3000:]


def _process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and its descendants (Linux /proc)."""
    pids, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def _process_states(root_pid: int) -> str:
    """The state letters (R, S, T, ...) of ``root_pid``'s process tree."""
    states = ""
    for pid in _process_tree(root_pid):
        try:
            states += Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
    return states


def test_a_run_continues_on_another_number_of_processes(tmp_path, env):
    """2 processes, killed after step 2; 1 process continues, killed after step 4; 3 processes finish (CPU, gloo).
    The global batch (12) stays; each resume starts at the checkpointed global step and the epochs end where
    an uninterrupted run's do (the samples: tests/integration/test_data_pipeline.py)."""
    from tests.helpers import grey_folder

    grey_folder(tmp_path / "ds", train=(24, 24), val=(3, 3))  # 48 images: 4 steps of 12 per epoch
    out = tmp_path / "run"
    args = ["--model.peers", "cifar_resnet8", "cifar_resnet8", "--data", str(tmp_path / "ds"), "--data.image_size", "32",
            "--data.batch_size", "12", "--data.num_threads", "1", "--loop.epochs", "2", "--checkpoint.every_steps", "1",
            "--log.tensorboard", "off", "--log.progress", "off", "--out", str(out)]
    logs = []
    for nproc, fault in ((2, "kill@step=3"), (1, "kill@step=6"), (3, None)):
        extra = {"FASTAFD_FAULT": fault} if fault else {}
        proc = subprocess.run([str(RUN_SH), *args], env={**env(tmp_path, NPROC=nproc), **extra}, capture_output=True, text=True,
                              timeout=600)
        logs.append(proc.stdout + proc.stderr)
        assert (proc.returncode != 0) == (fault is not None), logs[-1][-3000:]
    assert "resuming from" in logs[1] and "at epoch 1, step 2; on 1 processes, written by 2" in logs[1], logs[1][-3000:]
    assert "at epoch 2, step 5; on 3 processes, written by 1" in logs[2], logs[2][-3000:]
    assert [(r["epoch"], r["step"]) for r in rundir.read_metrics(out)] == [(1, 4), (2, 8)]
    assert json.loads((out / rundir.ENV_FILE).read_text())["world_size"] == 3
