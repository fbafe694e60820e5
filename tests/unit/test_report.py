"""fastafd report: its numbers are the hand computation from the runs' metrics.jsonl, and a failed, running or
unstarted cell is shown as such (never averaged in, never dropped); the claims' verdicts are computed."""

import csv
import json
import math

import pytest

from fastafd import args, cli
from fastafd.experiments import claims, plan
from fastafd.experiments import state as cellstate
from fastafd.run import rundir, runlock

TINY = ["--data.format", "synthetic", "--data.synthetic_samples", "64", "--data.batch_size", "16", "--loop.epochs", "2"]
IND, AFD = "demo_resnet8_resnet20_independent", "demo_resnet8_resnet20_afd"

# (recipe, seed) -> per epoch (peer0, peer1, ensemble) top-1
RUNS = {
    (IND, 0): [(40, 45, 46), (50, 55, 56)],
    (IND, 1): [(44, 47, 48), (52, 53, 57)],
    (IND, 2): [(45, 50, 51), (57, 60, 61)],
    (IND, 3): [(41, 41, 41)],  # running (lock held), one epoch so far
    (AFD, 0): [(48, 50, 52), (55, 58, 60)],
    (AFD, 1): [(58, 52, 53), (56, 57, 59)],  # peer 0's best is epoch 1, not its final
    (AFD, 2): [(30, 30, 30)],  # failed after epoch 1
    # (AFD, 3): never started
}


def write_metrics(run, epochs):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / rundir.METRICS_FILE, "w") as f:
        for e, (a, b, ens) in enumerate(epochs, 1):
            f.write(json.dumps({"epoch": e, "step": 4 * e, "peers": [{"name": "cifar_resnet8", "top1": a}, {"name": "cifar_resnet20", "top1": b}],
                                "ensemble_top1": ens}) + "\n")


def make_sweep(root, runs, recipes, seeds, grid=None):
    cells = plan.plan_cells(recipes, seeds, TINY)
    root.mkdir()
    rundir.write_json(root / plan.MANIFEST, plan.merge(None, cells, overrides=TINY, grid=grid, sweep=root, command="c", executor="local"))
    for (recipe, seed), epochs in runs.items():
        write_metrics(root / "runs" / f"{recipe}-seed{seed}", epochs)
    return {c.name: c for c in cells}


def hand(values):
    """Mean and sample standard deviation, written out."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def from_metrics(sweep, recipe, seeds, column, metric):
    """The hand computation: read each run's metrics.jsonl and take the column's last (final) or highest (best) value."""
    out = []
    for seed in seeds:
        rows = [json.loads(line) for line in (sweep / "runs" / f"{recipe}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        per_row = [r["ensemble_top1"] if column == "ensemble" else
                   sum(p["top1"] for p in r["peers"]) / len(r["peers"]) if column == "peers" else
                   r["peers"][int(column[-1])]["top1"] for r in rows]
        out.append(per_row[-1] if metric == "final" else max(per_row))
    return out


@pytest.fixture
def report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    cells = make_sweep(sweep, RUNS, [IND, AFD], (0, 1, 2, 3))
    (sweep / "logs").mkdir()
    (sweep / "logs" / f"{AFD}-seed2.log").write_text("epoch 1/2 ...\nfastafd: error: non-finite losses for 20 steps: lower the learning rate\n")
    cellstate.write_status(sweep, cells[f"{AFD}-seed2"], {"exit": 1})
    lock = runlock.RunLock(sweep / "runs" / f"{IND}-seed3")
    lock.acquire()
    try:
        assert cli.main(["report", str(sweep), "--out", str(tmp_path / "out"), "--name", "t"]) == 0
    finally:
        lock.release()
    out = tmp_path / "out"
    return sweep, out, json.loads((out / "t.json").read_text()), (out / "t.md").read_text(), capsys.readouterr().out


def _row(data, recipe):
    (table,) = data["tables"]
    return next(r for r in table["rows"] if r["recipe"] == recipe)


@pytest.mark.parametrize("column", ["peer0", "peer1", "ensemble", "peers"])
@pytest.mark.parametrize("metric", ["best", "final"])
def test_means_stds_counts_and_gains_equal_the_hand_computation(report, column, metric):
    sweep, _, data, _, _ = report
    ind_mean, ind_std = hand(from_metrics(sweep, IND, (0, 1, 2), column, metric))
    afd_mean, afd_std = hand(from_metrics(sweep, AFD, (0, 1), column, metric))
    ind, afd = _row(data, IND)["stats"][column][metric], _row(data, AFD)["stats"][column][metric]
    assert (ind["n"], afd["n"]) == (3, 2)  # the running, failed and unstarted cells are not averaged in
    assert ind["mean"] == pytest.approx(ind_mean) and ind["std"] == pytest.approx(ind_std)
    assert afd["mean"] == pytest.approx(afd_mean) and afd["std"] == pytest.approx(afd_std)
    assert afd["gain_vs_independent"] == pytest.approx(afd_mean - ind_mean) and ind["gain_vs_independent"] is None


def test_known_values(report):
    _, _, data, md, _ = report
    s = _row(data, AFD)["stats"]["peer0"]
    assert (s["final"]["mean"], s["best"]["mean"]) == (55.5, 56.5)  # best takes epoch 1 of seed 1 (58 > 56)
    assert "| `afd` | 2 | 56.50 ± 2.12 (+3.50) | 55.50 ± 0.71 (+2.50) |" in md
    assert "| `independent` | 3 | 53.00 ± 3.61 | 53.00 ± 3.61 |" in md


def test_failed_running_and_unstarted_cells_are_shown_as_such(report):
    _, out, data, md, printed = report
    assert "2 done; failed: seed 2; pending: seed 3 |" in md
    assert "3 done; running: seed 3 |" in md
    assert f"* `{AFD}-seed2`: **failed** (epoch 1/2): exit 1, an error: fastafd: error: non-finite losses" in md
    assert f"* `{IND}-seed3`: **running** (epoch 1/2): lock held by host" in md
    assert f"* `{AFD}-seed3`: **pending** (epoch 0/2): not started" in md
    states = {c["name"]: c["state"] for r in data["tables"][0]["rows"] for c in r["cells"]}
    assert states == {f"{IND}-seed{i}": "done" for i in range(3)} | {f"{IND}-seed3": "running", f"{AFD}-seed0": "done",
                                                                    f"{AFD}-seed1": "done", f"{AFD}-seed2": "failed", f"{AFD}-seed3": "pending"}
    with open(out / "t.csv") as f:
        rows = list(csv.DictReader(f))
    afd = next(r for r in rows if r["recipe"] == AFD and r["column"] == "peer0" and r["metric"] == "final")
    assert (afd["mean"], afd["n"], afd["gain_vs_independent"], afd["failed_seeds"], afd["pending_seeds"]) == ("55.5000", "2", "2.5000", "2", "3")
    assert md in printed  # the Markdown is also printed


def test_png_is_drawn_when_matplotlib_is_installed(report):
    pytest.importorskip("matplotlib")
    from PIL import Image

    _, out, *_ = report
    img = Image.open(out / "t.png")
    assert img.format == "PNG" and len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 3


def test_run_folders_and_folders_of_runs_are_reported_too(tmp_path, capsys):
    for name, method, seed, epochs in (("a", "independent", 0, [(10, 11, 12), (20, 21, 22)]), ("b", "independent", 1, [(30, 31, 32), (40, 41, 42)]),
                                       ("c", "afd", 0, [(50, 51, 52)])):
        run = tmp_path / "runs" / name
        write_metrics(run, epochs)
        cfg = args.parse_train_args(["--recipe", f"demo_resnet8_resnet20_{method}", "--system.seed", str(seed), *TINY])
        from fastafd.config import to_dict

        (run / rundir.CONFIG_FILE).write_text(json.dumps(to_dict(cfg)))
    assert cli.main(["report", str(tmp_path / "runs"), "--png", "off"]) == 0
    data = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    ind = _row(data, IND)["stats"]["peer0"]["final"]
    assert (ind["mean"], ind["n"]) == (30.0, 2)
    assert _row(data, AFD)["stats"]["peer0"]["final"]["n"] == 0  # c stopped after epoch 1 of 2
    assert "* `c`: **pending** (epoch 1/2): unfinished: epoch 1 of 2" in (tmp_path / "runs" / "report" / "report.md").read_text()


def test_a_sweep_given_twice_counts_each_run_once(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_sweep(sweep, {k: v for k, v in RUNS.items() if k[0] == IND and len(v) == 2}, [IND], (0, 1, 2))
    assert cli.main(["report", str(sweep), str(tmp_path / "." / "sweep"), "--png", "off"]) == 0
    ind = _row(json.loads((sweep / "report" / "report.json").read_text()), IND)["stats"]["peer0"]["final"]
    assert ind["n"] == 3 and ind["mean"] == pytest.approx(sum(hand([50, 52, 57])[:1]))


def _run_folder(run, recipe, epochs, *options):
    from fastafd.config import to_dict

    write_metrics(run, epochs)
    cfg = args.parse_train_args(["--recipe", recipe, *options, *TINY])
    (run / rundir.CONFIG_FILE).write_text(json.dumps(to_dict(cfg)))


def test_runs_of_one_recipe_with_other_methods_are_rows_of_their_own_and_a_seed_twice_is_refused(tmp_path, capsys):
    _run_folder(tmp_path / "runs" / "a", IND, [(10, 11, 12), (20, 21, 22)], "--method.name", "afd")
    _run_folder(tmp_path / "runs" / "b", IND, [(30, 31, 32), (40, 41, 42)])
    assert cli.main(["report", str(tmp_path / "runs"), "--png", "off"]) == 0
    rows = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())["tables"][0]["rows"]
    assert sorted((r["method"], r["stats"]["peer0"]["final"]["mean"]) for r in rows) == [("afd", 20.0), ("independent", 40.0)]
    capsys.readouterr()
    _run_folder(tmp_path / "runs" / "c", IND, [(30, 31, 32), (44, 41, 42)])  # b again: same recipe, method and seed
    assert cli.main(["report", str(tmp_path / "runs"), "--png", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "two runs with seed 0" in err and "report them separately" in err


def test_report_refuses_a_folder_that_is_not_a_sweep_or_run_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "neither a sweep folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# -- claims ------------------------------------------------------------------------------------------


def test_verdicts_are_computed_from_per_seed_differences():
    claim = claims.Claim(1, "a beats b", (claims.Term(1, "a", "peers"), claims.Term(-1, "b", "peers")))
    v = claims.evaluate(claim, {("a", "peers"): {0: 60, 1: 62, 2: 61}, ("b", "peers"): {0: 58, 1: 61, 2: 60}})
    assert v.seeds == (0, 1, 2) and v.mean == pytest.approx(4 / 3) and v.spread == pytest.approx(math.sqrt(1 / 3))
    assert v.verdict == claims.SUPPORTED
    v = claims.evaluate(claim, {("a", "peers"): {0: 60, 1: 62, 2: 61}, ("b", "peers"): {0: 59, 1: 63, 2: 60.5}})
    assert v.verdict == claims.NOT_RESOLVED and "within the seed spread" in v.reason  # diffs 1, -1, 0.5
    v = claims.evaluate(claim, {("a", "peers"): {0: 50, 1: 51, 2: 50}, ("b", "peers"): {0: 58, 1: 61, 2: 60}})
    assert v.verdict == claims.CONTRADICTED
    v = claims.evaluate(claim, {("a", "peers"): {0: 60, 1: 62, 2: 61}, ("b", "peers"): {2: 50}})
    assert v.verdict == claims.NOT_RESOLVED and v.seeds == (2,) and "fewer than 2 seeds" in v.reason


def test_a_claims_sweep_report_evaluates_every_claim_and_says_which_are_not_resolved(tmp_path, capsys):
    pair = "demo_resnet8_resnet20"
    runs = {}
    for seed, (afd, dml) in enumerate([(60, 55), (62, 58), (61, 57)]):
        runs[(f"{pair}_afd", seed)] = [(afd, afd, afd)]
        runs[(f"{pair}_dml", seed)] = [(dml, dml, dml)]
    sweep = tmp_path / "s"
    make_sweep(sweep, {k: v * 2 for k, v in runs.items()}, [f"{pair}_afd", f"{pair}_dml"], (0, 1, 2), grid="claims-demo")
    assert cli.main(["report", str(sweep), "--png", "off"]) == 0
    data = json.loads((sweep / "report" / "report.json").read_text())
    verdicts = data["claims"]["claims-demo"]["verdicts"]
    assert len(verdicts) == 7
    by = {v["statement"]: v for v in verdicts}
    dml = next(v for s, v in by.items() if "beats DML" in s)
    assert dml["verdict"] == "supported" and dml["mean"] == pytest.approx(13 / 3) and dml["seeds"] == [0, 1, 2]
    assert all(v["verdict"] == "not resolved" for s, v in by.items() if "beats DML" not in s)  # their runs are missing
    md = (sweep / "report" / "report.md").read_text()
    assert "## Claims (grid `claims-demo`)" in md and "**supported**: +4.33 exceeds the seed spread 0.58" in md
