"""Two CPU processes (gloo) under `accelerate launch` against one process with the same global batch."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.dist_worker import VARIANTS

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests/integration/dist_worker.py"), str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(f"2-process run: {time.monotonic() - start:.1f} s")
    return out


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run, variant):
    rank0, rank1 = load(two_process_run / f"{variant}.rank0.pt"), load(two_process_run / f"{variant}.rank1.pt")
    single = load(two_process_run / f"{variant}.single.pt")
    assert rank0.keys() == rank1.keys() == single.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{variant}: {k} differs between ranks"
    worst = max(((rank0[k] - single[k]).abs().max().item(), k) for k in rank0)
    assert worst[0] < 1e-5, f"{variant}: 2 processes vs 1 process, largest difference {worst[0]:.2e} in {worst[1]}"
    initial = load(two_process_run / f"{variant}.initial.pt")
    moved = [k for k in rank0 if not torch.equal(rank0[k], initial[k])]
    assert len(moved) > len(rank0) // 2, f"{variant}: only {len(moved)} of {len(rank0)} parameters trained"  # the comparison sees trained weights


def test_batchnorm_buffers_are_averaged_and_parameters_agree_in_training_mode(two_process_run):
    r0, r1 = load(two_process_run / "bn_train.rank0.pt"), load(two_process_run / "bn_train.rank1.pt")
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    differed = [k for k in r0["before"] if not torch.allclose(r0["before"][k], r1["before"][k])]
    assert differed, "each rank's BatchNorm statistics should differ before averaging (different data)"
    for k in r0["before"]:
        mean = (r0["before"][k] + r1["before"][k]) / 2
        assert torch.equal(r0["after"][k], r1["after"][k]), k
        torch.testing.assert_close(r0["after"][k], mean, rtol=1e-6, atol=1e-7, msg=k)
