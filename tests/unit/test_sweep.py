"""fastafd sweep without training: the plan (recipes x seeds, shared options), the manifest, cell states from files,
the Slurm array pieces, and one-line refusals that write nothing."""

import json
import shlex

import pytest

from fastafd import args, cli, errors, recipes
from fastafd.errors import UserError
from fastafd.experiments import plan, slurm
from fastafd.experiments import state as cellstate
from fastafd.run import rundir, runlock
from tests.battery.harness import Case, run_case

TINY = ["--data.format", "synthetic", "--data.synthetic_samples", "64", "--data.batch_size", "16", "--loop.epochs", "2"]


def test_patterns_expand_in_recipe_order_once_each():
    known = list(recipes.RECIPES)
    got = plan.expand_recipes(["cifar100_resnet32_resnet110_*", "cifar100_resnet32_resnet110_afd", "demo"], known)
    assert got[-1] == "demo" and got.count("cifar100_resnet32_resnet110_afd") == 1
    assert set(got[:-1]) == {r for r in known if r.startswith("cifar100_resnet32_resnet110_")}
    assert [r for r in known if r in got[:-1]] == got[:-1]
    with pytest.raises(UserError, match="matches no recipe: did you mean"):
        plan.expand_recipes(["cifar100_resnt32_afd"], known)


def test_the_paper_table_pattern_names_every_method_of_the_resnet32_pairs():
    got = plan.expand_recipes(["cifar100_resnet32_*"], list(recipes.RECIPES))
    from fastafd.methods import registry

    paired = [m for m in registry.names() if not registry.get(m).same_architecture]
    branched = {f"cifar100_resnet32_{m}" for m in registry.names() if registry.get(m).same_architecture}  # one, cl: 3 branches
    want = {f"cifar100_resnet32{pair}_{m}" for pair in ("", "_resnet110", "_k3") for m in paired}
    assert set(got) == want | branched | {"cifar100_resnet32_wrn28_4_afd", "cifar100_resnet32_vits8_afd"}
    assert len(got) == 3 * len(paired) + len(branched) + 2  # the README's count (25 with its 9 methods)


def test_cells_are_recipes_times_seeds_with_the_shared_options_and_a_fixed_run_folder(tmp_path):
    cells = plan.plan_cells(["demo_resnet8_afd", "demo_resnet8_dml"], (0, 3), TINY)
    assert [c.name for c in cells] == ["demo_resnet8_afd-seed0", "demo_resnet8_afd-seed3", "demo_resnet8_dml-seed0", "demo_resnet8_dml-seed3"]
    c = cells[1]
    assert c.argv == ("--recipe", "demo_resnet8_afd", "--system.seed", "3", *TINY)
    assert (c.method, c.peers, c.epochs, c.data) == ("afd", ("cifar_resnet8", "cifar_resnet8"), 2, "synthetic")
    assert c.train_args(tmp_path)[-2:] == ["--out", str(tmp_path.resolve() / "runs" / c.name)]
    assert shlex.split(c.command(tmp_path)) == ["fastafd", "train", *c.train_args(tmp_path)]
    cfg = args.parse_train_args(c.train_args(tmp_path))  # the exact command trains what the cell says
    assert cfg.system.seed == 3 and cfg.recipe == "demo_resnet8_afd" and cfg.loop.epochs == 2


def test_default_folder_depends_only_on_the_command():
    assert str(plan.default_out(None, ["cifar100_resnet32_*"])) == "sweeps/cifar100_resnet32_all"
    assert str(plan.default_out("claims-demo", [])) == "sweeps/claims-demo"


def test_manifest_keeps_earlier_cells_first_adds_new_ones_and_refuses_other_options(tmp_path):
    first = plan.plan_cells(["demo_resnet8_afd"], (0, 1), TINY)
    m = plan.merge(None, first, overrides=TINY, grid=None, sweep=tmp_path, command="c1", executor="local")
    more = plan.plan_cells(["demo_resnet8_afd"], (1, 2), TINY)
    m2 = plan.merge(m, more, overrides=TINY, grid=None, sweep=tmp_path, command="c2", executor="local")
    assert [c["name"] for c in m2["cells"]] == ["demo_resnet8_afd-seed0", "demo_resnet8_afd-seed1", "demo_resnet8_afd-seed2"]
    assert [h["command"] for h in m2["history"]] == ["c1", "c2"] and m2["command"] == "c2"
    assert m2["cells"][0]["command"].startswith("fastafd train --recipe demo_resnet8_afd --system.seed 0")
    with pytest.raises(UserError, match="pass another --out"):
        plan.merge(m, plan.plan_cells(["demo_resnet8_afd"], (0,), [*TINY, "--loop.epochs", "3"]), overrides=[*TINY, "--loop.epochs", "3"],
                 grid=None, sweep=tmp_path, command="c3", executor="local")


def test_array_spec_compresses_runs():
    assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert slurm.array_spec([4]) == "4"


def test_cell_file_round_trips_awkward_arguments_through_bash(tmp_path):
    import subprocess

    cell = plan.Cell("r-seed0", "r", 0, ("--recipe", "r", "--data", "/d/with space/$HOME'x"), "afd", ("a", "b"), 2, "demo")
    path = tmp_path / "0.sh"
    path.write_text(slurm.cell_file(cell, tmp_path))
    out = subprocess.run(["bash", "-c", f'source {shlex.quote(str(path))}; printf "%s\\n" "$CELL" "$RUN_DIR" "${{ARGS[@]}}"'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["r-seed0", str(tmp_path.resolve() / "runs" / "r-seed0"), *cell.argv]


def test_a_newline_in_an_argument_stays_inside_the_cell_file_comment(tmp_path):
    import subprocess

    marker = tmp_path / "ran"
    cell = plan.Cell("r-seed0", "r", 0, ("--recipe", "r", "--data", f"/d\ntouch {marker}"), "afd", ("a", "b"), 2, "demo")
    path = tmp_path / "0.sh"
    path.write_text(slurm.cell_file(cell, tmp_path))
    out = subprocess.run(["bash", "-c", f'source {shlex.quote(str(path))}; printf "%s\\0" "${{ARGS[@]}}"'],
                         capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert out == list(cell.argv) and not marker.exists()  # the argument intact, nothing of it run as a command


def test_a_failing_squeue_stops_a_submission_instead_of_submitting_queued_cells_again(tmp_path, monkeypatch):
    import subprocess

    (tmp_path / plan.SLURM).mkdir()
    (tmp_path / plan.SLURM / "jobs.jsonl").write_text(json.dumps({"job": "7", "cells": {"0": "r-seed0"}}) + "\n")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/" + name)
    answers = {"busy": subprocess.CompletedProcess([], 1, "", "slurm_load_jobs error: Socket timed out on send/recv operation"),
               "gone": subprocess.CompletedProcess([], 1, "", "slurm_load_jobs error: Invalid job id specified")}
    for case, answer in answers.items():
        monkeypatch.setattr(slurm.subprocess, "run", lambda *a, answer=answer, **k: answer)
        assert slurm.slurm_queue(tmp_path) == {}  # what status shows: not in the queue
        if case == "busy":
            with pytest.raises(errors.RunStopped, match="nothing submitted"):
                slurm.slurm_queue(tmp_path, strict=True)
        else:
            assert slurm.slurm_queue(tmp_path, strict=True) == {}  # Slurm has forgotten the job: it is not queued


def _fake_run(run, epochs):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / rundir.METRICS_FILE, "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({"epoch": e, "peers": [{"top1": 50.0}, {"top1": 51.0}], "ensemble_top1": 52.0}) + "\n")


def test_cell_state_is_read_from_the_files(tmp_path):
    cell = plan.plan_cells(["demo_resnet8_afd"], (0,), TINY)[0]
    run = tmp_path / cell.run_dir
    assert cellstate.cell_state(tmp_path, cell) == cellstate.CellState("pending", 0, "not started")
    _fake_run(run, 1)
    assert cellstate.cell_state(tmp_path, cell).state == "pending" and cellstate.cell_state(tmp_path, cell).epochs_done == 1
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / f"{cell.name}.log").write_text("epoch 1/2 ...\nfastafd: error: something broke: fix it\n")
    cellstate.write_status(tmp_path, cell, {"exit": 1})
    st = cellstate.cell_state(tmp_path, cell)
    assert st.state == "failed" and "exit 1" in st.detail and "fastafd: error: something broke" in st.detail
    assert cellstate.cell_state(tmp_path, cell, {cell.name: "job 7_0 PENDING"}).state == "pending"  # requeued: queued wins
    with runlock.RunLock(run):
        st = cellstate.cell_state(tmp_path, cell)
        assert st.state == "running" and "pid" in st.detail
    _fake_run(run, 2)
    assert cellstate.cell_state(tmp_path, cell).state == "done"  # the last epoch, whatever was recorded before
    cellstate.write_status(tmp_path, cell, {"exit": -9})
    assert cellstate.cell_state(tmp_path, cell).state == "done"


def test_exit_codes_in_words():
    assert cellstate.describe_exit(-9) == "exit -9, killed by SIGKILL"
    assert cellstate.describe_exit(143) == "exit 143, stopped on SIGTERM"
    assert "mistake" in cellstate.describe_exit(2)


BAD = [
    Case("no-cells", lambda tmp: ["sweep", "--out", str(tmp / "s")], needle="--recipes NAME_OR_PATTERN"),
    Case("pattern-matches-nothing", lambda tmp: ["sweep", "--recipes", "cifar100_resnt*", "--out", str(tmp / "s")], needle="matches no recipe"),
    Case("grid-and-recipes", lambda tmp: ["sweep", "--grid", "claims-demo", "--recipes", "demo", "--out", str(tmp / "s")], needle="pass one of them"),
    Case("unknown-grid", lambda tmp: ["sweep", "--grid", "claims", "--out", str(tmp / "s")], needle="unknown grid 'claims'"),
    Case("seed-in-options", lambda tmp: ["sweep", "--recipes", "demo", "--out", str(tmp / "s"), "--", "--system.seed", "3"], needle="--seeds"),
    Case("out-in-options", lambda tmp: ["sweep", "--recipes", "demo", "--out", str(tmp / "s"), "--", "--out", str(tmp / "r")], needle="set by the sweep"),
    Case("bad-train-option", lambda tmp: ["sweep", "--recipes", "demo", "--out", str(tmp / "s"), "--", "--loop.epoch", "3"], needle="unknown option --loop.epoch"),
    Case("bad-value", lambda tmp: ["sweep", "--recipes", "demo", "--out", str(tmp / "s"), "--", "--optim.lr", "nan"], needle="optim.lr"),
    Case("dataset-missing", lambda tmp: ["sweep", "--recipes", "cifar100_resnet32_afd", "--out", str(tmp / "s")], needle="pass its folder after --"),
    Case("dataset-not-there", lambda tmp: ["sweep", "--recipes", "cifar100_resnet32_afd", "--out", str(tmp / "s"), "--", "--data", str(tmp / "nope")],
         needle="does not exist"),
    Case("negative-seed", lambda tmp: ["sweep", "--recipes", "demo", "--seeds", "-1", "--out", str(tmp / "s")], needle="distinct seeds >= 0"),
    Case("unknown-sweep-option", lambda tmp: ["sweep", "--recipe", "demo"], needle="--recipe"),
    Case("status-of-nothing", lambda tmp: ["sweep", "status", str(tmp / "nope")], needle="pass a sweep folder"),
    Case("sbatch-args-unbalanced", lambda tmp: ["sweep", "--recipes", "demo", "--executor", "slurm", "--sbatch_args=--comment 'x",
                                                "--out", str(tmp / "s"), "--dry_run"], needle="No closing quotation"),
]


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_sweep_commands_are_one_line_exit_2_and_write_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_case(case, tmp_path, capsys)


def test_other_shared_options_on_an_existing_sweep_are_refused_and_leave_it_unchanged(tmp_path, capsys):
    sweep = tmp_path / "s"
    cells = plan.plan_cells(["demo_resnet8_afd"], (0,), TINY)
    sweep.mkdir()
    rundir.write_json(sweep / plan.MANIFEST, plan.merge(None, cells, overrides=TINY, grid=None, sweep=sweep, command="c", executor="local"))
    case = Case("other-options", lambda tmp: ["sweep", "--recipes", "demo_resnet8_afd", "--out", str(sweep), "--", *TINY, "--loop.epochs", "3"],
                needle="pass another --out")
    run_case(case, tmp_path, capsys)


def test_dry_run_prints_every_cell_command_and_the_sbatch_line(tmp_path, capsys):
    sweep = tmp_path / "s"
    code = cli.main(["sweep", "--recipes", "demo_resnet8_afd", "demo_resnet8_l1", "--seeds", "0", "1", "--out", str(sweep),
                     "--executor", "slurm", "--gpus_per_node", "0", "--parallel", "3", "--dry-run", "--", *TINY])
    out = capsys.readouterr().out
    assert code == 0 and not sweep.exists()
    assert out.count("fastafd train --recipe demo_resnet8_") == 4
    assert "sbatch --parsable --array=0-3%3 " in out and "--nodes=1" in out and "gpus-per-node" not in out
    assert out.rstrip().endswith("slurm/sweep.sbatch")


def test_slurm_without_sbatch_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    case = Case("no-sbatch", lambda tmp: ["sweep", "--recipes", "demo", "--out", str(tmp / "s"), "--executor", "slurm", "--", *TINY],
                needle="needs sbatch on PATH")
    run_case(case, tmp_path, capsys)
