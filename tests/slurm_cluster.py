"""A local two-node Slurm cluster for the tests (tests/slurm/start_cluster.sh), or a skip.

Each state folder is its own cluster on ports picked free by the script, so a test cluster starts beside
another one (or any other Slurm daemon) on the machine; a port it cannot have fails the start with the
script's one line naming it. The waits are generous, since the work they wait for is bounded (a few
training steps): on a busy machine a slow job passes instead of timing out, and a timeout says what
the job and the daemons last reported.
"""

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


def require() -> None:
    """Skip where the local cluster cannot run: Slurm not installed, or not root."""
    if not shutil.which("sbatch") or not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        pytest.skip("Slurm is not installed (apt-get install --no-install-recommends slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (SlurmUser=root)")


def start(state_dir: Path) -> dict[str, str]:
    """Start the cluster; the environment for sbatch/squeue/scontrol. Skips where Slurm cannot run here."""
    require()
    proc = subprocess.run([str(START), str(state_dir)], capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"local Slurm cluster did not start (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return {**os.environ, "SLURM_CONF": str(state_dir / "slurm.conf")}


def state_dir(tmp_path_factory) -> Path:
    """The cluster's folder: FASTAFD_SLURM_DIR, else a new temporary folder (one cluster per test module)."""
    given = os.environ.get("FASTAFD_SLURM_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("slurm")


def daemon_logs(env: dict, lines: int = 15) -> str:
    """The last lines of the cluster's daemon logs (for a failure message)."""
    folder = Path(env.get("SLURM_CONF", "")).parent
    out = []
    for log in sorted(folder.glob("slurm*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(out)


def stop(state_dir: Path) -> None:
    subprocess.run([str(START), "--stop", str(state_dir)], capture_output=True, timeout=60)


def sbatch(env: dict, *args: str, cwd: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(predicate, timeout: float, what: str, poll: float = 0.3, explain=None):
    """Poll ``predicate`` until it returns something true; on timeout, an AssertionError with ``explain()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{explain()}" if explain else ""))


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def explain_job(env: dict, job: str, log: Path | None = None):
    """A failure message's details: the job's state and reason, its log's tail, the daemons' logs."""
    def explain() -> str:
        info = job_info(env, job)
        parts = [f"job {job}: " + " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "Restarts", "ExitCode", "NodeList"))]
        if log is not None and Path(log).exists():
            parts.append(f"--- {log}\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-30:]))
        parts.append(daemon_logs(env))
        return "\n".join(parts)
    return explain


def wait_done(env: dict, job: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Poll until the job has left the queue (faster than sbatch --wait); its final record."""
    def done():
        info = job_info(env, job)
        return info if info.get("JobState") in FINAL_STATES else None
    return wait_until(done, timeout, f"job {job} to finish", explain=explain_job(env, job, log))
