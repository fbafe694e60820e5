"""The real slurm/train.sbatch on a local 2-node Slurm cluster (skipped where Slurm cannot run)."""

import json
import subprocess
from pathlib import Path

import pytest

from fastafd.run import rundir
from tests import slurm_cluster as sc

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # the real CLI: subprocesses that train

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm/train.sbatch"
TINY = ["--model.peers", "cifar_resnet8", "cifar_resnet8", "--data.format", "synthetic", "--data.image_size", "32",
        "--data.batch_size", "16", "--data.synthetic_classes", "10", "--log.tensorboard", "off", "--log.progress", "lines"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = sc.state_dir(tmp_path_factory)  # its own ports: starts beside other Slurm daemons
    env = sc.start(state)
    yield env
    sc.stop(state)


def job_env(cluster, tmp_path, run_dir):
    keep = {k: v for k, v in cluster.items() if not k.startswith(("SLURM_JOB", "MASTER_", "NODE_RANK", "NNODES", "NPROC", "DRY_RUN"))}
    return {**keep, "FASTAFD_ROOT": str(ROOT), "CPU": "1", "NPROC": "1", "OMP_NUM_THREADS": "1",
            "FASTAFD_CACHE": str(tmp_path / "cache"), "RUN_DIR": str(run_dir)}


def log_of(tmp_path, job):
    path = tmp_path / f"slurm-fastafd-{job}.out"
    return path.read_text() if path.exists() else ""


def preempted_two_node_job(cluster, tmp_path, run):
    """A 2-node job of 2 x 120 steps, sent SIGUSR1 once it reached step 10 (what Slurm does --signal
    seconds before the time limit); its id and output file."""
    job = sc.sbatch(job_env(cluster, tmp_path, run), "--nodes=2", str(SBATCH), *TINY, "--data.synthetic_samples", "4096",
                    "--loop.epochs", "2", "--loop.max_steps_per_epoch", "120", "--loop.log_interval", "5",
                    "--checkpoint.every_steps", "0", cwd=tmp_path)
    out = tmp_path / f"slurm-fastafd-{job}.out"
    sc.wait_until(lambda: "epoch 1/2 step 10/" in log_of(tmp_path, job), 600, "training to reach step 10", explain=sc.explain_job(cluster, job, out))
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True, timeout=30)
    return job, out


def test_two_node_job_trains_on_both_nodes(cluster, tmp_path):
    run = tmp_path / "run"
    job = sc.sbatch(job_env(cluster, tmp_path, run), "--nodes=2", str(SBATCH), *TINY, "--data.synthetic_samples", "512",
                    "--loop.epochs", "2", "--loop.max_steps_per_epoch", "5", "--loop.log_interval", "5", cwd=tmp_path)
    info = sc.wait_done(cluster, job, timeout=600, log=tmp_path / f"slurm-fastafd-{job}.out")  # bounded work: generous
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "run.sh: node 0/2" in log and "run.sh: node 1/2" in log  # one launcher per node, ranks from SLURM_NODEID
    assert json.loads((run / rundir.ENV_FILE).read_text())["world_size"] == 2
    assert [(r["epoch"], r["step"]) for r in rundir.read_metrics(run)] == [(1, 5), (2, 10)]


def test_preemption_signal_checkpoints_requeues_and_resumes(cluster, tmp_path):
    run = tmp_path / "run"
    steps = 2 * 120
    job, out = preempted_two_node_job(cluster, tmp_path, run)
    def requeued():
        info = sc.job_info(cluster, job)
        return info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING", "COMPLETED")
    sc.wait_until(requeued, 300, "the job to requeue itself", explain=sc.explain_job(cluster, job, out))
    # a requeued job is held back by a begin time Slurm sets (about 2 min); release it now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, capture_output=True, timeout=30)
    info = sc.wait_done(cluster, job, timeout=600, log=out)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert f"Slurm job {job} requeued" in log, log[-3000:]
    stop = int(log.split("stopped at step ")[1].split()[0])
    assert 10 <= stop < 120, log[-3000:]  # mid-epoch 1, at a log point
    assert f"resuming from {run}/checkpoints/" in log and f"at epoch 1, step {stop}" in log, log[-3000:]
    assert "(restart 1)" in log
    assert [(r["epoch"], r["step"]) for r in rundir.read_metrics(run)] == [(1, steps // 2), (2, steps)]


def test_a_requeued_job_resumes_on_fewer_nodes(cluster, tmp_path):
    """A 2-node job is preempted; while it waits, node2 is drained and the job shrunk to one node (what a user
    does when the cluster lost nodes: scontrol update JobId=N NumNodes=1 NumTasks=1); it continues on node1 alone from the
    2-process checkpoint and its epochs end where an uninterrupted run's do (the global batch is kept)."""
    run = tmp_path / "run"
    job, out = preempted_two_node_job(cluster, tmp_path, run)
    def waiting():  # requeued and no longer completing: only a pending job takes the updates below
        info = sc.job_info(cluster, job)
        return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"
    sc.wait_until(waiting, 300, "the job to requeue itself", explain=sc.explain_job(cluster, job, out))
    node2 = ["scontrol", "update", "NodeName=node2"]
    try:
        subprocess.run([*node2, "State=DRAIN", "Reason=fewer-nodes-test"], env=cluster, check=True, capture_output=True, timeout=30)
        subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1"], env=cluster, check=True, capture_output=True, timeout=30)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, capture_output=True, timeout=30)
        info = sc.wait_done(cluster, job, timeout=600, log=out)
    finally:
        subprocess.run([*node2, "State=RESUME"], env=cluster, capture_output=True, timeout=30)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    first, second = log.split("(restart 1)")
    assert "run.sh: node 1/2" in first and "run.sh: node 1/2" not in second, log[-3000:]  # 2 nodes, then 1
    assert second.split("\n")[0].startswith(" on node1;"), second[:300]
    stop = int(log.split("stopped at step ")[1].split()[0])
    assert f"at epoch 1, step {stop}; on 1 processes, written by 2" in second, second[-3000:]
    assert [(r["epoch"], r["step"]) for r in rundir.read_metrics(run)] == [(1, 120), (2, 240)]
    assert json.loads((run / rundir.ENV_FILE).read_text())["world_size"] == 1
