"""fastafd sweep --executor slurm on the local 2-node Slurm cluster: one sbatch --array, each task one cell through
slurm/sweep.sbatch -> slurm/train.sbatch; a preempted task requeues itself alone and resumes its cell (skipped where
Slurm cannot run)."""

import json
import subprocess

import pytest

from fastafd.experiments import plan
from fastafd.experiments import state as cellstate
from fastafd.run import rundir
from tests import slurm_cluster as sc

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # the real CLI: subprocesses that train

RECIPE = "demo_resnet8_independent"
TINY = ["--data.format", "synthetic", "--data.image_size", "32", "--data.batch_size", "16", "--data.synthetic_classes", "10",
        "--data.synthetic_samples", "4096", "--log.tensorboard", "off", "--log.progress", "lines", "--loop.epochs", "2",
        "--loop.max_steps_per_epoch", "120", "--loop.log_interval", "5", "--checkpoint.every_steps", "0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = sc.state_dir(tmp_path_factory)
    env = sc.start(state)
    yield env
    sc.stop(state)


def job_env(cluster, tmp_path):
    keep = {k: v for k, v in cluster.items() if not k.startswith(("SLURM_JOB", "SLURM_ARRAY", "MASTER_", "NODE_RANK", "NNODES", "NPROC", "DRY_RUN"))}
    return {**keep, "CPU": "1", "NPROC": "1", "OMP_NUM_THREADS": "1", "FASTAFD_CACHE": str(tmp_path / "cache")}


def sweep(fastafd_cli, env, out, *extra):
    args = ["sweep", *extra, "--recipes", RECIPE, "--seeds", "0", "1", "--out", str(out), "--executor", "slurm", "--gpus_per_node", "0",
            "--", *TINY]
    return fastafd_cli.run(args, env, check=False, cwd=out.parent, timeout=300)


def log(out, seed):
    path = out / plan.LOGS / f"{RECIPE}-seed{seed}.log"
    return path.read_text() if path.exists() else ""


def test_a_two_cell_array_trains_both_cells_and_a_preempted_task_requeues_alone_and_resumes(cluster, tmp_path, fastafd_cli):
    env, out = job_env(cluster, tmp_path), tmp_path / "sweep"
    first = sweep(fastafd_cli, env, out)
    assert first.returncode == 0, first.stderr
    (submission,) = [json.loads(line) for line in (out / plan.SLURM / "jobs.jsonl").read_text().splitlines()]
    job = submission["job"]
    assert submission["cells"] == {"0": f"{RECIPE}-seed0", "1": f"{RECIPE}-seed1"} and "--array=0-1 " in submission["command"]
    assert f"submitted job {job}: an array of 2 cells" in first.stdout

    task0 = f"{job}_0"
    explain = sc.explain_job(cluster, task0, out / plan.LOGS / f"{RECIPE}-seed0.log")
    sc.wait_until(lambda: "epoch 1/2 step 10/" in log(out, 0), 600, "cell 0 to reach step 10", explain=explain)
    subprocess.run(["scancel", "--signal=USR1", task0], env=cluster, check=True, timeout=30)  # what --signal=USR1@180 does

    def requeued():
        info = sc.job_info(cluster, task0)
        return info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING", "COMPLETED")

    sc.wait_until(requeued, 300, "array task 0 to requeue itself", explain=explain)
    # the same command while task 0 is queued (task 1 running or done): nothing is submitted twice. Here, not
    # before the preemption: a CLI start on a loaded machine can outlast a whole cell.
    again = sweep(fastafd_cli, env, out)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    assert len((out / plan.SLURM / "jobs.jsonl").read_text().splitlines()) == 1
    status = fastafd_cli.run(["sweep", "status", out], env, check=False, timeout=120)
    assert status.returncode == 0 and f"{RECIPE}-seed0" in status.stdout, status.stderr
    subprocess.run(["scontrol", "update", f"JobId={task0}", "StartTime=now"], env=cluster, capture_output=True, timeout=30)
    for index in (0, 1):
        info = sc.wait_done(cluster, f"{job}_{index}", timeout=900, log=out / plan.LOGS / f"{RECIPE}-seed{index}.log")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log(out, index)[-3000:]

    cells = {c.name: c for c in plan.cells_of(plan.load_manifest(out))}
    for index in (0, 1):
        cell = cells[f"{RECIPE}-seed{index}"]
        assert cellstate.cell_state(out, cell).state == cellstate.DONE
        assert [(r["epoch"], r["step"]) for r in rundir.read_metrics(out / cell.run_dir)] == [(1, 120), (2, 240)]  # each epoch once
        recorded = cellstate.read_status(out, cell)
        assert recorded["exit"] == 0 and recorded["job"] == f"{job}_{index}" and recorded["executor"] == "slurm"
    text = log(out, 0)
    assert f"array task {job}_0" in text and "restart 1" in text, text[-3000:]
    stop = int(text.split("stopped at step ")[1].split()[0])
    assert 10 <= stop < 120 and "requeued" in text.split("stopped at step ")[1].splitlines()[0], text[-3000:]
    assert f"resuming from {(out / cells[f'{RECIPE}-seed0'].run_dir).resolve()}/checkpoints/" in text and f"at epoch 1, step {stop}" in text
    assert "restart 1" not in log(out, 1) and "resuming from" not in log(out, 1)  # the other task was left alone
    done = sweep(fastafd_cli, env, out)
    assert done.returncode == 0 and "nothing to submit" in done.stdout
