"""``fastafd report``: the paper's tables from runs: one table per pair, methods as rows, mean +- std over seeds.

Reads sweep folders (``fastafd sweep``: the manifest names every cell, finished or not), run folders
(``fastafd train``) and folders of run folders. Cells are grouped into tables by what makes results
comparable (the peers, the data, the number of epochs), rows by method (by recipe where two recipes
share a method). Every table has, per peer and for the ensemble, the **best** (the best evaluated epoch)
and the **final** (last epoch) top-1: the mean over the finished seeds +- their sample standard
deviation, the seed count, and the difference of the means from the ``independent`` row of the same
table. A cell that failed, is running or has not finished is named in its row's status and in the
list below the tables: never dropped silently, never averaged in.

For a sweep of a named grid with claims (``fastafd sweep --grid claims-demo``) the report evaluates
them (:mod:`fastafd.experiments.claims`): per claim the per-seed difference, its mean and seed spread, and the
computed verdict. Outputs: ``NAME.md`` (Markdown, also printed), ``NAME.csv`` (one line per row,
column and metric), ``NAME.json`` (everything, per seed) and ``NAME.png`` (final top-1 bars with
+-std whiskers, one panel per table; needs matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import io
import json
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tyro.conf import Positional

from fastafd.args import PROG, tyro_parse
from fastafd.errors import UserError
from fastafd.experiments import claims, grids, plan
from fastafd.experiments import state as cellstate
from fastafd.experiments import sweep as sweeps
from fastafd.run import outputs, readback, rundir, runlock

METRICS = ("best", "final")


@dataclass
class ReportArgs:
    """Tables of results: one per pair (peers, data, epochs), methods as rows; per peer and for the ensemble the best and final top-1 as mean +- std over seeds, the seed count and the gain over independent. Failed, running and unfinished cells are shown as such."""

    dirs: Positional[tuple[Path, ...]]
    """Sweep folders (`fastafd sweep`), run folders (`fastafd train`), or folders of run folders."""

    out: Path | None = None
    """A file ending in .md (NAME.csv, NAME.json and NAME.png are written beside it), or a folder for NAME.md, NAME.csv, NAME.json and NAME.png; default: <first DIR>/report. Never over a file fastafd did not write."""

    name: str = "report"
    """File name stem of the outputs in a folder --out (a file --out names them itself)."""

    png: Literal["auto", "on", "off"] = "auto"
    """The bar chart: auto when matplotlib is installed (pip install 'fastafd[plot]'), on requires it, off leaves it out."""


@dataclass
class CellResult:
    """One cell (a run): what it is, where it stands, and its top-1 per column when it finished."""

    cell: plan.Cell
    state: cellstate.CellState
    best: dict[str, float] = field(default_factory=dict)
    """Column -> the best top-1 over its evaluated epochs (finished runs only)."""
    final: dict[str, float] = field(default_factory=dict)
    """Column -> the top-1 of its last epoch (finished runs only)."""
    load: list[float] = field(default_factory=list)
    """1-minute load averages the local executor recorded at its start and end (how busy the machine was)."""
    run: Path = Path()
    """The cell's run folder."""


@dataclass
class Stat:
    """Mean +- sample standard deviation over the finished seeds of one column and metric of one row."""

    mean: float | None
    std: float | None
    """None with fewer than 2 seeds."""
    n: int
    gain: float | None = None
    """Difference of ``mean`` from the independent row's (None: this is that row, or there is none)."""


@dataclass
class Row:
    label: str
    method: str
    recipe: str
    cells: list[CellResult]
    stats: dict[str, dict[str, Stat]] = field(default_factory=dict)
    """Column -> metric (best, final) -> statistics."""


@dataclass
class Table:
    title: str
    peers: tuple[str, ...]
    data: str
    epochs: int
    rows: list[Row]

    @property
    def columns(self) -> list[str]:
        return columns(len(self.peers))


def columns(k: int) -> list[str]:
    """``peer0`` ... ``peer<k-1>``, ``ensemble``, and ``peers`` (the mean of the peers' top-1 within a run)."""
    return [f"peer{i}" for i in range(k)] + ["ensemble", "peers"]


def run_values(rows: Sequence[Mapping]) -> tuple[dict[str, float], dict[str, float]]:
    """(best, final) top-1 per column from a run's metrics rows; best is the maximum over epochs of each column."""
    per_epoch = []
    for row in sorted(rows, key=lambda r: r["epoch"]):
        peers = [float(p["top1"]) for p in row["peers"]]
        values = {f"peer{i}": v for i, v in enumerate(peers)}
        values["ensemble"] = float(row["ensemble_top1"])
        values["peers"] = statistics.fmean(peers)
        per_epoch.append(values)
    if not per_epoch:
        return {}, {}
    best = {c: max(v[c] for v in per_epoch) for c in per_epoch[-1]}
    return best, dict(per_epoch[-1])


def _result(cell: plan.Cell, state: cellstate.CellState, run: Path, status: Mapping) -> CellResult:
    result = CellResult(cell, state, run=Path(run), load=[float(v) for v in (status.get("load_start"), status.get("load_end")) if isinstance(v, (int, float))])
    if state.state == cellstate.DONE:
        try:
            lines = rundir.metrics_lines(run)
        except UserError as e:
            result.state = cellstate.CellState(cellstate.FAILED, state.epochs_done, f"unreadable {rundir.METRICS_FILE}: {e}")
            return result
        if lines.damaged:  # never averaged in: a skipped line may be the best epoch
            result.state = cellstate.CellState(cellstate.FAILED, state.epochs_done, cellstate.damage(lines) + "; restore the line to report this cell")
            return result
        try:
            result.best, result.final = run_values([r for r in lines.rows if r["epoch"] <= cell.epochs])
        except (ValueError, KeyError, TypeError) as e:
            result.state = cellstate.CellState(cellstate.FAILED, state.epochs_done, f"{run / rundir.METRICS_FILE} has no top-1 ({type(e).__name__}: {e})")
    return result


def _cell_of_run(run: Path) -> plan.Cell:
    """A stand-alone run folder as a cell (named after its folder), from its config.json."""
    from fastafd.config import from_dict

    fix = f"pass run folders written by `{PROG} train`"
    raw = readback.read_json(run / rundir.CONFIG_FILE, fix)
    try:
        cfg = from_dict(raw)
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"{run / rundir.CONFIG_FILE} is not a fastafd config ({e}): {fix}") from None
    try:
        data = plan.data_label(cfg)
    except (UserError, OSError):
        data = cfg.data.format
    return plan.Cell(name=run.name, recipe=cfg.recipe, seed=cfg.system.seed, argv=(), method=cfg.method.name,
                       peers=tuple(cfg.model.peers), epochs=cfg.loop.epochs, data=data)


def _run_state(run: Path, cell: plan.Cell) -> cellstate.CellState:
    held = runlock.holder(run)
    last = cellstate.epochs_done(run)
    if held:
        return cellstate.CellState(cellstate.RUNNING, last, f"lock held by {held}")
    if last >= cell.epochs:
        return cellstate.CellState(cellstate.DONE, last, "")
    return cellstate.CellState(cellstate.PENDING, last, f"unfinished: epoch {last} of {cell.epochs}")


def collect(dirs: Sequence[Path]) -> tuple[list[CellResult], list[str]]:
    """Every cell of ``dirs`` with its state and values, and the named grids among the sweeps."""
    if not dirs:
        raise UserError(f"give at least one sweep or run folder, e.g. {PROG} report sweeps/claims-demo")
    results: list[CellResult] = []
    grid_names: list[str] = []
    for d in map(Path, dirs):
        if (d / plan.MANIFEST).is_file():
            manifest = plan.load_manifest(d)
            cells = plan.cells_of(manifest)
            st = sweeps.states(d, cells)
            results += [_result(c, st[c.name], d / c.run_dir, cellstate.read_status(d, c)) for c in cells]
            if manifest.get("grid") and manifest["grid"] not in grid_names:
                grid_names.append(manifest["grid"])
        elif (d / rundir.CONFIG_FILE).is_file():
            cell = _cell_of_run(d)
            results.append(_result(cell, _run_state(d, cell), d, {}))
        elif d.is_dir() and (runs := sorted(p for p in d.iterdir() if (p / rundir.CONFIG_FILE).is_file())):
            for run in runs:
                cell = _cell_of_run(run)
                results.append(_result(cell, _run_state(run, cell), run, {}))
        else:
            what = "does not exist" if not d.exists() else "is neither a sweep folder, a run folder nor a folder of run folders"
            raise UserError(f"{d} {what}: pass folders written by `{PROG} sweep` or `{PROG} train`")
    unique: dict[Path, CellResult] = {}  # a run reached twice (a sweep and its runs/ folder, a folder given twice) counts once
    for r in results:
        unique.setdefault(r.run.resolve(), r)
    return list(unique.values()), grid_names


def _stat(values: Sequence[float]) -> Stat:
    if not values:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) >= 2 else None, len(values))


_ORDER = ("independent", "dml", "kdcl", "l1", "l2", "afd_shared", "afd")
"""Row order within a table (the paper's: baselines first, AFD last); other methods after them."""


def build_tables(results: Sequence[CellResult]) -> list[Table]:
    """Group the cells into tables (peers, data, epochs) and rows (method; recipe where a method has several),
    with the statistics of every column and metric over the finished seeds, and the gains over independent."""
    tables: dict[tuple, dict[str, list[CellResult]]] = {}
    for r in results:
        key = (r.cell.peers, r.cell.data, r.cell.epochs)
        tables.setdefault(key, {}).setdefault((r.cell.recipe, r.cell.method), []).append(r)
    out = []
    for (peers, data, epochs), by_recipe in tables.items():
        methods = [method for _, method in by_recipe]
        rows = []
        for (recipe, method), cells in by_recipe.items():
            seeds = [r.cell.seed for r in cells]
            if len(set(seeds)) != len(seeds):
                twice = sorted({x for x in seeds if seeds.count(x) > 1})
                runs = ", ".join(str(r.run) for r in cells if r.cell.seed in twice)
                raise UserError(f"{method} ({recipe}) on {' + '.join(peers)} has two runs with seed {twice[0]} ({runs}), "
                                "which one mean would count twice: report them separately (one folder each)")
            label = method if methods.count(method) == 1 else f"{method} ({recipe})"
            rows.append(Row(label, method, recipe, sorted(cells, key=lambda r: r.cell.seed)))
        rows.sort(key=lambda r: (_ORDER.index(r.method) if r.method in _ORDER else len(_ORDER), r.label))
        table = Table(f"{' + '.join(peers)} ({data} data, {epochs} epoch{'s' if epochs != 1 else ''})", peers, data, epochs, rows)
        for row in rows:
            done = [r for r in row.cells if r.state.state == cellstate.DONE]
            row.stats = {c: {m: _stat([getattr(r, m)[c] for r in done if c in getattr(r, m)]) for m in METRICS} for c in table.columns}
        base = next((r for r in rows if r.method == "independent"), None)
        if base is not None:
            for row in rows:
                if row is base:
                    continue
                for c in table.columns:
                    for m in METRICS:
                        mine, theirs = row.stats[c][m], base.stats[c][m]
                        if mine.mean is not None and theirs.mean is not None:
                            mine.gain = mine.mean - theirs.mean
        out.append(table)
    return out


def claim_values(results: Sequence[CellResult]) -> dict[tuple[str, str], dict[int, float]]:
    """``{(recipe, column): {seed: final top-1}}`` over the finished cells: what :func:`fastafd.experiments.claims.evaluate` reads."""
    values: dict[tuple[str, str], dict[int, float]] = {}
    for r in results:
        if r.state.state == cellstate.DONE:
            for column, v in r.final.items():
                values.setdefault((r.cell.recipe, column), {})[r.cell.seed] = v
    return values


# -- output -------------------------------------------------------------------------------------


def fmt(stat: Stat, *, gain: bool = True) -> str:
    """``71.23 ± 0.85 (+1.20)``; one seed: no ±; no finished seed: an en dash."""
    if stat.mean is None:
        return "–"
    text = f"{stat.mean:.2f}" + (f" ± {stat.std:.2f}" if stat.std is not None else "")
    if gain and stat.gain is not None:
        text += f" ({stat.gain:+.2f})"
    return text


def row_status(row: Row) -> str:
    """``3 done`` or ``2 done; failed: seed 2; running: seed 3; pending: seed 4``."""
    by = {s: [r.cell.seed for r in row.cells if r.state.state == s] for s in (cellstate.DONE, cellstate.FAILED, cellstate.RUNNING, cellstate.PENDING)}
    parts = [f"{len(by[cellstate.DONE])} done"]
    for s in (cellstate.FAILED, cellstate.RUNNING, cellstate.PENDING):
        if by[s]:
            parts.append(f"{s}: seed{'s' if len(by[s]) > 1 else ''} {' '.join(map(str, by[s]))}")
    return "; ".join(parts)


def _peer_header(table: Table, column: str) -> str:
    if column == "ensemble":
        return "ensemble"
    if column == "peers":
        return "mean of peers"
    k = int(column.removeprefix("peer"))
    return f"peer {k} {table.peers[k]}"


def markdown(tables: Sequence[Table], verdicts: Mapping[str, list[claims.Verdict]], results: Sequence[CellResult], *, command: str,
             date: str) -> str:
    lines = ["# Results", "", f"`{command}` ({date})", "",
             "Top-1 (%) on the validation set: mean ± sample standard deviation over the finished seeds; in brackets the "
             "difference of the means from the `independent` row of the same table. *best*: the best evaluated epoch of each "
             "run; *final*: its last epoch. *mean of peers*: the peers' top-1 averaged within each run. Cells that failed, are "
             "running or have not finished are listed in *status* and below, and are not in the means."]
    for table in tables:
        cols = [c for c in table.columns if c != "peers"] + ["peers"]
        head = ["method", "seeds"] + [f"{_peer_header(table, c)} best" if m == "best" else m for c in cols for m in METRICS] + ["status"]
        lines += ["", f"## {table.title}", "", "| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (2 * len(cols)) + " --- |"]
        for row in table.rows:
            n = row.stats[cols[0]]["final"].n
            cells = [fmt(row.stats[c][m]) for c in cols for m in METRICS]
            lines.append("| " + " | ".join([f"`{row.label}`", str(n), *cells, row_status(row)]) + " |")
    unfinished = [r for r in results if r.state.state != cellstate.DONE]
    if unfinished:
        lines += ["", "## Cells not in the means", ""]
        lines += [f"* `{r.cell.name}`: **{r.state.state}** (epoch {r.state.epochs_done}/{r.cell.epochs}){': ' + r.state.detail if r.state.detail else ''}"
                  for r in unfinished]
    for name, vs in verdicts.items():
        grid = grids.get(name)
        lines += ["", f"## Claims (grid `{name}`)", "", grid.scope, "",
                  "Each comparison is formed per seed (runs with the same seed start from the same peer weights and read the "
                  "same batches), from the final top-1; *difference*: its mean over the seeds where every term finished ± its "
                  "standard deviation over them (the seed spread). Verdict, computed: *supported* when the mean is positive and "
                  "larger than the seed spread, *contradicted* when negative and larger, *not resolved* otherwise (or with fewer "
                  "than 2 seeds).", "",
                  "| claim | comparison | difference (points) | seeds | verdict |", "| ---: | --- | ---: | --- | --- |"]
        for v in vs:
            diff = "–" if v.mean is None else f"{v.mean:+.2f}" + (f" ± {v.spread:.2f}" if v.spread is not None else "")
            lines.append(f"| {v.claim.number} | {v.claim.statement} | {diff} | {' '.join(map(str, v.seeds)) or '–'} | "
                         f"**{v.verdict}**: {v.reason} |")
    load = [x for r in results for x in r.load]
    if load:
        lines += ["", f"Machine load while the cells ran (1-minute load average at each cell's start and end, as recorded by the "
                      f"local executor): {min(load):.2f} to {max(load):.2f}."]
    return "\n".join(lines) + "\n"


def rows_csv(tables: Sequence[Table]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "method", "recipe", "column", "peer", "metric", "mean", "std", "n", "gain_vs_independent",
                "done_seeds", "failed_seeds", "running_seeds", "pending_seeds"])
    for table in tables:
        for row in table.rows:
            seeds = {s: " ".join(str(r.cell.seed) for r in row.cells if r.state.state == s)
                     for s in (cellstate.DONE, cellstate.FAILED, cellstate.RUNNING, cellstate.PENDING)}
            for c in table.columns:
                for m in METRICS:
                    st = row.stats[c][m]
                    w.writerow([table.title, row.method, row.recipe, c, _peer_header(table, c), m,
                                *("" if v is None else f"{v:.4f}" for v in (st.mean, st.std)), st.n,
                                "" if st.gain is None else f"{st.gain:.4f}", *seeds.values()])
    return buf.getvalue()


def as_json(tables: Sequence[Table], verdicts: Mapping[str, list[claims.Verdict]], *, command: str, date: str) -> dict:
    def stat(s: Stat) -> dict:
        return {"mean": s.mean, "std": s.std, "n": s.n, "gain_vs_independent": s.gain}

    return {
        "command": command, "date": date,
        "tables": [{
            "title": t.title, "peers": list(t.peers), "data": t.data, "epochs": t.epochs,
            "rows": [{
                "method": r.method, "recipe": r.recipe, "label": r.label,
                "stats": {c: {m: stat(r.stats[c][m]) for m in METRICS} for c in t.columns},
                "cells": [{"name": x.cell.name, "seed": x.cell.seed, "state": x.state.state, "detail": x.state.detail,
                           "epochs_done": x.state.epochs_done, "best": x.best, "final": x.final} for x in r.cells],
            } for r in t.rows],
        } for t in tables],
        "claims": {name: {"scope": grids.get(name).scope, "verdicts": [{
            "claim": v.claim.number, "statement": v.claim.statement,
            "terms": [{"coef": t.coef, "recipe": t.recipe, "column": t.column} for t in v.claim.terms],
            "seeds": list(v.seeds), "mean": v.mean, "spread": v.spread, "verdict": v.verdict, "reason": v.reason,
        } for v in vs]} for name, vs in verdicts.items()},
    }  # fmt: skip


def chart(path: Path, tables: Sequence[Table], writer: outputs.Outputs | None = None) -> Path | None:
    """Final top-1 per method (groups) and per peer and ensemble (bars), mean +- std; one panel per table."""
    from fastafd.experiments.plot import BarPanel, grouped_bar_chart

    panels = []
    for t in tables:
        if not any(r.stats[t.columns[0]]["final"].n for r in t.rows):
            continue
        series = {_peer_header(t, c): ([r.stats[c]["final"].mean for r in t.rows], [r.stats[c]["final"].std for r in t.rows])
                  for c in t.columns if c != "peers"}
        panels.append(BarPanel(t.title, [r.label for r in t.rows], series, ylabel="final top-1 (%), mean ± std over seeds"))
    if not panels:
        return None
    lows = [m - (s or 0) for p in panels for vals, errs in p.series.values() for m, s in zip(vals, errs) if m is not None]
    low = max(0.0, (min(lows) // 5) * 5 - 5) if lows else 0.0
    return grouped_bar_chart(path, panels, title="Final top-1 per method: peers and ensemble", ylim=(low, 100.0), writer=writer)


def cmd_report(argv: Sequence[str]) -> int:
    outputs.refuse_empty(argv)
    args: ReportArgs = tyro_parse(ReportArgs, argv, prog=f"{PROG} report", description=ReportArgs.__doc__ or "")  # type: ignore[assignment]
    if not args.name.strip() or "/" in args.name:
        raise UserError(f"--name {args.name!r} must be a file name stem, e.g. --name claims")
    want_png = args.png == "on" or (args.png == "auto" and importlib.util.find_spec("matplotlib") is not None)
    if args.png == "on":
        from fastafd.errors import require

        require("matplotlib", "plot", "The report's chart")
    results, grid_names = collect(args.dirs)
    if not results:
        raise UserError(f"{' '.join(map(str, args.dirs))} hold no cells: pass folders written by `{PROG} sweep` or `{PROG} train`")
    outputs.check_empty(args.out)
    folder, stem = outputs.resolve(args.out, Path(args.dirs[0]) / "report", ".md", args.name)
    if args.out is not None and folder != Path(args.out) and args.name != "report":
        raise UserError(f"--out {args.out} names the file and --name {args.name} the stem: pass one of them")
    writer = outputs.Outputs([folder / f"{stem}.{ext}" for ext in ("md", "csv", "json", "png")],
                             folder=folder if folder == Path(args.out or folder) else None)
    writer.check()
    tables = build_tables(results)
    values = claim_values(results)
    verdicts = {name: [claims.evaluate(c, values) for c in grids.get(name).claims] for name in grid_names if grids.GRIDS.get(name) and grids.get(name).claims}
    command = shlex.join([PROG, "report", *argv])
    date = dt.datetime.now().isoformat(timespec="seconds")
    md = markdown(tables, verdicts, results, command=command, date=date)
    written = [writer.write_text(folder / f"{stem}.md", md), writer.write_text(folder / f"{stem}.csv", rows_csv(tables)),
               writer.write_text(folder / f"{stem}.json", json.dumps(as_json(tables, verdicts, command=command, date=date), indent=2) + "\n")]
    if want_png and (png := chart(folder / f"{stem}.png", tables, writer)) is not None:
        written.append(png)
    sys.stdout.write(md)
    for path in written:
        print(path)
    return 0
