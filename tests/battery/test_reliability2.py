"""Reliability round 2 (issue 26): nothing of the user's overwritten, no traceback for a damaged file, one line for
each refusal. Each test is one case of the issue, and fails on the code before it (see the README's reliability
section for the list of cases tried and held)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from fastafd import cli
from fastafd.checkpoint import paths, store
from fastafd.experiments import plan
from fastafd.experiments import state as cellstate
from fastafd.run import rundir
from tests.battery.harness import Case, run_case, tree_digest
from tests.battery.test_run_folder import read_only
from tests.unit.test_report import AFD, IND, TINY, make_sweep

RUNS = {(IND, 0): [(40, 45, 46), (50, 55, 56)], (IND, 1): [(44, 47, 48), (52, 53, 57)],
        (AFD, 0): [(48, 50, 52), (55, 58, 60)], (AFD, 1): [(58, 52, 53), (56, 57, 59)]}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_sweep(root, RUNS, [IND, AFD], (0, 1))
    return root


def report(*args: str) -> list[str]:
    return ["report", *map(str, args)]


# -- case 1: report --out never over a file fastafd did not write --------------------------------------------------


def test_empty_out_is_refused_and_a_users_report_md_in_the_current_folder_is_kept(sweep, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "report.md").write_text("my own notes\n")
    monkeypatch.chdir(home)
    run_case(Case("empty-out", lambda tmp: report(sweep, "--out", ""), needle="--out is empty"), tmp_path, capsys)
    run_case(Case("empty-out=", lambda tmp: report(sweep, "--out="), needle="--out is empty"), tmp_path, capsys)
    assert (home / "report.md").read_text() == "my own notes\n"


@pytest.mark.parametrize("target,needle", [
    ("notes.md", "fastafd did not write it"),  # a file of the user's, named as the report
    ("folder", "did not write (it holds other files)"),  # a folder of the user's
    (".", "did not write (it holds other files)"),
    ("notes.md/report", "is a file, not a folder"),  # a path under a file
])
def test_out_naming_something_the_report_did_not_write_is_refused(sweep, tmp_path, capsys, monkeypatch, target, needle):
    home = tmp_path / "home"
    (home / "folder").mkdir(parents=True)
    (home / "folder" / "keep.txt").write_text("mine")
    (home / "notes.md").write_text("mine")
    monkeypatch.chdir(home)
    run_case(Case(f"out-{target}", lambda tmp: report(sweep, "--out", target), needle=needle), tmp_path, capsys)


def test_out_ending_in_md_is_the_file_with_its_siblings_beside_it_and_a_rerun_replaces_them(sweep, tmp_path, capsys):
    out = tmp_path / "results" / "table.md"
    assert cli.main(report(sweep, "--out", out, "--png", "off")) == 0
    assert out.is_file() and (out.parent / "table.csv").is_file() and (out.parent / "table.json").is_file()
    assert cli.main(report(sweep, "--out", out, "--png", "off")) == 0  # its own files: replaced
    out.write_text(out.read_text() + "my edit\n")  # edited since: kept
    run_case(Case("edited", lambda tmp: report(sweep, "--out", out), needle="was changed since fastafd wrote it"), tmp_path, capsys)


def test_default_report_folder_is_rewritten_by_a_second_report(sweep, capsys):
    assert cli.main(report(sweep, "--png", "off")) == 0
    assert cli.main(report(sweep, "--png", "off")) == 0
    assert (sweep / "report" / "report.md").is_file() and (sweep / "report" / ".fastafd-outputs.json").is_file()


def test_plot_and_bench_refuse_a_file_like_or_empty_out(sweep, tmp_path, capsys):
    run = sweep / "runs" / f"{IND}-seed0"
    run_case(Case("plot-png", lambda tmp: ["plot", str(run), "--out", "curves.png"], needle="looks like a file name"), tmp_path, capsys)
    run_case(Case("plot-empty", lambda tmp: ["plot", str(run), "--out", ""], needle="--out is empty"), tmp_path, capsys)
    run_case(Case("bench-empty", lambda tmp: ["bench", "step", "--out", ""], needle="--out is empty"), tmp_path, capsys)


def test_plot_refuses_to_overwrite_a_users_png(sweep, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = sweep / "runs" / f"{IND}-seed0"
    mine = tmp_path / "pics"
    mine.mkdir()
    (mine / "top1.png").write_bytes(b"my picture")
    run_case(Case("plot-users-png", lambda tmp: ["plot", str(run), "--out", str(mine)], needle="did not write"), tmp_path, capsys)


# -- case 3: damaged metrics files: the line named and skipped, the cell marked, the others reported -----------------


DAMAGE = {
    "non-utf8": b'{"epoch": 2, "peers": [{"top1": 5\xff}], "ensemble_top1": 1}\n',
    "epoch-infinity": b'{"epoch": Infinity, "peers": [{"top1": 50}, {"top1": 50}], "ensemble_top1": 50}\n',
    "nan-top1": b'{"epoch": 2, "peers": [{"top1": NaN}, {"top1": 50}], "ensemble_top1": 50}\n',
    "huge-epoch": b'{"epoch": 1e999, "peers": [], "ensemble_top1": 50}\n',
    "a-list": b"[1, 2, 3]\n",
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_metrics_line_is_named_and_skipped_in_status_and_report(damage, sweep, capsys):
    metrics = sweep / "runs" / f"{AFD}-seed1" / rundir.METRICS_FILE
    with open(metrics, "ab") as f:
        f.write(DAMAGE[damage])
    assert cli.main(["sweep", "status", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and f"{metrics}:3" in out
    assert cli.main(report(sweep, "--png", "off")) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert f"`{AFD}-seed1`: **failed**" in out and f"{metrics}:3" in out  # the cell marked damaged, named
    assert "| `independent` | 2 |" in out  # the other cells reported as usual


# -- case 4: an unwritable report --out ---------------------------------------------------------------------------


def test_report_into_a_read_only_folder_is_one_line_naming_the_path_and_error(sweep, tmp_path, capsys, monkeypatch):
    mount = tmp_path / "ro"
    mount.mkdir()
    read_only(monkeypatch, mount)
    line = run_case(Case("ro-report", lambda tmp: report(sweep, "--out", mount / "r", "--png", "off"), needle="read-only file system"),
                    tmp_path, capsys)
    assert str(mount / "r") in line


# -- case 8: hand-edited sweep folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [plan.STATUS, plan.LOGS])
def test_a_sweep_subfolder_present_as_a_file_is_one_line(name, tmp_path, capsys):
    root = tmp_path / "s"
    root.mkdir()
    (root / name).write_text("not a folder")
    case = Case(f"{name}-file", lambda tmp: ["sweep", "--recipes", IND, "--out", str(root), "--", *TINY], needle=f"{root / name} is a file")
    run_case(case, tmp_path, capsys)


@pytest.mark.parametrize("field,value", [("cells", {"a": 1}), ("cells", "x"), ("overrides", 3), ("history", "h"), ("cells", [[1]]),
                                         ("cells", [{"name": "x"}])])
def test_a_damaged_field_of_sweep_json_is_one_line_naming_file_and_field(field, value, sweep, tmp_path, capsys):
    manifest = json.loads((sweep / plan.MANIFEST).read_text())
    manifest[field] = value
    (sweep / plan.MANIFEST).write_text(json.dumps(manifest))
    for args in (["sweep", "status", str(sweep)], report(sweep, "--png", "off")):
        line = run_case(Case(f"manifest-{field}", lambda tmp, a=args: a, needle=str(sweep / plan.MANIFEST)), tmp_path, capsys)
        assert repr(field) in line or "cells[0]" in line


# -- case 9: numeric options are bounded at parse time -------------------------------------------------------------


@pytest.mark.parametrize("option,value", [("--system.dist_timeout_s", "100000000000000000000"), ("--system.peer_timeout_s", "inf"),
                                          ("--system.peer_timeout_s", "nan"), ("--data.synthetic_samples", str(2**60)),
                                          ("--system.bucket_mb", "1e300")])
def test_numeric_options_out_of_range_are_one_line(option, value, tmp_path, capsys):
    out = tmp_path / "run"
    run_case(Case(f"bound{option}", lambda tmp: ["train", "--out", str(out), option, value], needle=option.removeprefix("--")),
             tmp_path, capsys)
    assert not out.exists()


def test_every_bounded_option_states_its_range_in_its_help():
    from tyro._docstrings import get_field_docstring

    from fastafd import config

    sections = {f.name: f.type for f in __import__("dataclasses").fields(config.TrainConfig)}
    for name in config.BOUNDS:
        section, field = name.split(".")
        cls = getattr(config, {"system": "SystemConfig"}[section]) if section in ("system",) else None
        assert cls is not None and section in sections
        assert "Range:" in (get_field_docstring(cls, field, ()) or ""), name


# -- case 11: run folders and sweep folders do not mix --------------------------------------------------------------


def test_train_into_a_sweep_folder_is_refused(sweep, tmp_path, capsys):
    run_case(Case("train-into-sweep", lambda tmp: ["train", "--out", str(sweep), *TINY], needle="is a sweep folder"), tmp_path, capsys)


def test_sweep_into_a_run_folder_is_refused(sweep, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_json(run / rundir.CONFIG_FILE, {"recipe": "x"})
    case = Case("sweep-into-run", lambda tmp: ["sweep", "--recipes", IND, "--out", str(run), "--", *TINY], needle="is a run folder")
    run_case(case, tmp_path, capsys)
    run_case(Case("status-of-run", lambda tmp: ["sweep", "status", str(run)], needle="is a run folder"), tmp_path, capsys)


# -- case 12: a permission error on checkpoints/ names the OS error -----------------------------------------------------


def test_a_permission_error_on_checkpoints_names_it_not_free_space(tmp_path, monkeypatch):
    import torch

    from fastafd.errors import RunStopped

    real = os.mkdir

    def mkdir(path, *a, **kw):
        if Path(path).name == paths.CKPT_DIR or ".tmp-" in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    before = tree_digest([tmp_path])
    with pytest.raises(RunStopped) as e:
        store.write(tmp_path, 1, {paths.MODEL: {"w": torch.zeros(1)}}, {}, keep=1)
    msg = str(e.value)
    assert "permission denied" in msg and "Permission denied" in msg and "free space" not in msg
    assert tree_digest([tmp_path]) == before


# -- cases 2, 5, 6: the launcher (fast checks of each piece; the multi-process runs are in test_faults/test_launch) --------


def test_a_lost_store_names_the_launcher_on_node_0_not_rank_0():
    from fastafd.dist import PeerWatch

    watch = object.__new__(PeerWatch)
    watch.rank, watch.world_size = 1, 2
    line = watch.describe(None, None, "for 61 s")
    assert "the launcher on node 0 is gone" in line and "the last checkpoint is kept" in line
    assert "rank 0" not in line and "\n" not in line


def test_the_watchdogs_line_is_recorded_so_the_launcher_adds_none(tmp_path, monkeypatch, capsys):
    from fastafd import dist, launch

    monkeypatch.setenv("FASTAFD_ERROR_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit):
        dist._say("rank 0: rank 1 of 2 stopped (process died or hung, or node lost); no heartbeat for 9 s")
    capsys.readouterr()

    class Failure:
        exitcode, pid, hostname = 1, 123, "h"

    assert launch.report({0: Failure(), 1: Failure()}, tmp_path) == 1
    assert capsys.readouterr().err == ""  # named once, by rank 0: no "rank 0 exited with code 1" after it


def test_ctrl_c_under_the_launcher_is_said_once_by_the_launcher(tmp_path, monkeypatch, capsys):
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from fastafd import launch

    monkeypatch.setattr(LocalElasticAgent, "_shutdown", LocalElasticAgent._shutdown)  # restored after the test

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "recipes", (lambda argv: interrupted(), ""))
    monkeypatch.setenv("FASTAFD_ERROR_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["recipes"]) == 130
    assert capsys.readouterr().err == ""  # a rank under the launcher says nothing
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: (_ for _ in ()).throw(SignalException("SIGINT", signal.SIGINT)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert launch.main(["x.py"]) == 130
    assert capsys.readouterr().err == "fastafd: interrupted\n"


def test_the_stop_grace_is_an_option_with_a_bound_and_a_stopped_rank_is_woken(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    from fastafd import launch

    monkeypatch.setenv(launch.GRACE_ENV, "inf")
    assert launch.main(["x.py"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["fastafd: error: FASTAFD_STOP_GRACE_S='inf' must be a number of seconds in [1, 3600], e.g. 30"]
    monkeypatch.setattr(LocalElasticAgent, "_shutdown", LocalElasticAgent._shutdown)  # restored after the test
    launch._set_grace(4)
    stopped = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        closed = []

        class PContext:
            def pids(self):
                return {0: stopped.pid}

            def close(self, death_sig, timeout):
                closed.append(timeout)

        agent = object.__new__(LocalElasticAgent)
        agent._worker_watchdog = agent._health_check_server = None
        agent._pcontext = PContext()
        agent._shutdown()
        assert closed == [4]
        state = Path(f"/proc/{stopped.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state != "T"  # woken: it can act on the SIGTERM instead of being killed after the grace
    finally:
        stopped.kill()
        stopped.wait()


def test_an_error_folder_left_by_a_killed_launcher_is_removed_by_a_later_launch(tmp_path):
    from fastafd import launch

    old, new = tmp_path / "fastafd-errors-old", tmp_path / "fastafd-errors-new"
    old.mkdir()
    new.mkdir()
    os.utime(old, (0, 0))
    launch.clean_stale(tmp_path)
    assert not old.exists() and new.exists()


def test_a_damaged_slurm_jobs_file_does_not_stop_sweep_status(sweep, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (sweep / plan.SLURM).mkdir()
    (sweep / plan.SLURM / "jobs.jsonl").write_bytes(b'{"job": 7, "cells": {"0": "x"}}\n\xff\xfe\n[1]\n')
    assert cli.main(["sweep", "status", str(sweep)]) == 0
    assert "Traceback" not in capsys.readouterr().err


# -- case 10: a run folder deleted while its run trains --------------------------------------------------------------


def test_a_folder_deleted_while_the_command_runs_is_one_line(tmp_path, capsys, monkeypatch):
    gone = tmp_path / "sweep" / "runs" / "cell"

    def deleted(argv):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(gone / rundir.METRICS_FILE))

    monkeypatch.setitem(cli.COMMANDS, "recipes", (deleted, ""))
    assert cli.main(["recipes"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"fastafd: error: {gone} disappeared while the command ran (deleted or moved): restore it, or run "
                                        "the same command again (a run resumes from its newest checkpoint, if one is left)"]
    # the sweep then names the cell's one line: its state is read from files that may be gone
    cell = plan.plan_cells([IND], (0,), TINY)[0]
    (tmp_path / "sweep").mkdir(exist_ok=True)
    state = cellstate.cell_state(tmp_path / "sweep", cell)
    assert state.state == cellstate.PENDING and state.detail == "not started"
