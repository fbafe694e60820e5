"""fastafd sweep --executor local through the real CLI: killed mid-way and run again, no cell is trained twice and
none is lost; a cell that fails is recorded, reported as failed, and resumed by the next run."""

import json
import signal
import subprocess
import time

import pytest

from fastafd.experiments import plan
from fastafd.experiments import state as cellstate
from fastafd.run import rundir

pytestmark = pytest.mark.slow  # subprocesses that train

RECIPE = "demo_resnet8_independent"
TINY = ["--data.format", "synthetic", "--data.image_size", "32", "--data.batch_size", "16", "--data.synthetic_classes", "10",
        "--log.tensorboard", "off", "--log.progress", "lines", "--loop.epochs", "2"]


def sweep_cmd(out, seeds, *extra, shared=()):
    return ["sweep", "--recipes", RECIPE, "--seeds", *map(str, seeds), "--out", str(out), *extra,
            "--", *TINY, *shared]


@pytest.fixture
def env(fastafd_cli):
    """``env(tmp_path, **more)``: the sweep's environment (its own cache, one thread a cell)."""
    return lambda tmp_path, **more: fastafd_cli.env(tmp_path / "cache", OMP_NUM_THREADS=1, **more)


def cells(out):
    return {c.name: c for c in plan.cells_of(plan.load_manifest(out))}


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def log(out, name):
    path = out / plan.LOGS / f"{name}.log"
    return path.read_text() if path.exists() else ""


def test_a_sweep_killed_while_cell_2_trains_resumes_it_and_runs_no_cell_twice(tmp_path, env, fastafd_cli):
    out = tmp_path / "sweep"
    shared = ["--data.synthetic_samples", "1024", "--checkpoint.every_steps", "8", "--loop.log_interval", "4"]  # 64 steps per epoch
    first = fastafd_cli.popen(sweep_cmd(out, (0, 1, 2), shared=shared), env(tmp_path), stderr=subprocess.STDOUT)
    c1, c2, c3 = (f"{RECIPE}-seed{s}" for s in (0, 1, 2))
    try:
        wait_for(lambda: "epoch 1/2 step 16/" in log(out, c2), 600, "cell 2 to train 16 steps")
    finally:
        first.send_signal(signal.SIGKILL)  # the sweep process only: the kernel tells its cell to stop (SIGTERM)
        first.communicate(timeout=60)
    by_name = cells(out)
    done1 = (out / by_name[c1].run_dir / rundir.ENV_FILE).read_text()
    wait_for(lambda: cellstate.cell_state(out, by_name[c2]).state != cellstate.RUNNING, 120, "cell 2 to stop after the sweep was killed")
    assert cellstate.cell_state(out, by_name[c1]).state == cellstate.DONE
    assert cellstate.cell_state(out, by_name[c2]).state == cellstate.PENDING  # stopped, resumable: neither done nor lost
    assert cellstate.cell_state(out, by_name[c3]).state == cellstate.PENDING and not (out / by_name[c3].run_dir).exists()
    assert "stopped at step" in log(out, c2) and "on SIGTERM" in log(out, c2)  # it checkpointed, it did not just die

    again = fastafd_cli.run(sweep_cmd(out, (0, 1, 2), shared=shared), env(tmp_path), check=False, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{c1}: done, skipped" in again.stdout and f"{c2}: resumes" in again.stdout and f"{c3}: starts" in again.stdout
    assert (out / by_name[c1].run_dir / rundir.ENV_FILE).read_text() == done1  # cell 1 was not started again
    assert "resuming from" in log(out, c2).split("on SIGTERM")[1]  # cell 2 went on from its checkpoint
    assert log(out, c1).count("== ") == 1 and log(out, c2).count("== ") == 2 and log(out, c3).count("== ") == 1  # attempts
    for name in (c1, c2, c3):
        assert [r["epoch"] for r in rundir.read_metrics(out / by_name[name].run_dir)] == [1, 2], name  # every epoch once
    status = fastafd_cli.run(["sweep", "status", out], env(tmp_path), check=False)
    assert status.returncode == 0 and "3 cells: 3 done, 0 running, 0 failed, 0 pending" in status.stdout
    manifest = json.loads((out / plan.MANIFEST).read_text())
    assert [h["command"] for h in manifest["history"]][0] == manifest["command"] and len(manifest["history"]) == 2


def test_a_failing_cell_is_recorded_reported_as_failed_and_resumed_by_the_next_run(tmp_path, env, fastafd_cli):
    out = tmp_path / "sweep"
    shared = ["--data.synthetic_samples", "64", "--loop.max_steps_per_epoch", "4"]
    failed = fastafd_cli.run(sweep_cmd(out, (0, 1), "--parallel", "2", shared=shared), env(tmp_path, FASTAFD_FAULT="kill@step=3"),
                             check=False, timeout=900)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastafd: error: sweep ") and "0 of 2 cells done; 2 failed" in lines[0], failed.stderr
    by_name = cells(out)
    for cell in by_name.values():
        st = cellstate.cell_state(out, cell)
        assert st.state == cellstate.FAILED and "killed by SIGKILL" in st.detail, st
        assert cellstate.read_status(out, cell)["exit"] == -9
    report = fastafd_cli.run(["report", out, "--png", "off"], env(tmp_path), check=False)
    assert report.returncode == 0, report.stderr
    assert "| `independent` | 0 |" in report.stdout and "0 done; failed: seeds 0 1 |" in report.stdout
    assert f"* `{RECIPE}-seed0`: **failed**" in report.stdout

    again = fastafd_cli.run(sweep_cmd(out, (0, 1), "--parallel", "2", shared=shared), env(tmp_path), check=False, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for cell in by_name.values():
        assert cellstate.cell_state(out, cell).state == cellstate.DONE and cellstate.read_status(out, cell)["exit"] == 0
        assert [r["epoch"] for r in rundir.read_metrics(out / cell.run_dir)] == [1, 2]
