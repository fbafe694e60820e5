"""A local two-node Slurm cluster for the tests (tests/slurm/start_cluster.sh), or a skip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "tests/slurm/start_cluster.sh"


def start(state_dir: Path) -> dict[str, str]:
    """Start the cluster; the environment for sbatch/squeue/scontrol. Skips where Slurm cannot run here."""
    if not shutil.which("sbatch") or not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        pytest.skip("Slurm is not installed (apt-get install --no-install-recommends slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (SlurmUser=root)")
    proc = subprocess.run([str(START), str(state_dir)], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"local Slurm cluster did not start: {proc.stderr[-2000:]}"
    return {**os.environ, "SLURM_CONF": str(state_dir / "slurm.conf")}


def stop(state_dir: Path) -> None:
    subprocess.run([str(START), "--stop", str(state_dir)], capture_output=True, timeout=60)


def sbatch(env: dict, *args: str, cwd: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(predicate, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(env: dict, job: str, timeout: float) -> dict[str, str]:
    """Poll until the job has left the queue (faster than sbatch --wait); its final record."""
    def done():
        info = job_info(env, job)
        return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None
    return wait_until(done, timeout, f"job {job} to finish")
