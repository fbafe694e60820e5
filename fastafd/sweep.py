"""``fastafd sweep``: a grid of recipes x seeds (x options shared by every cell), each cell a normal run folder.

The paper's results are tables, "the average of 5 experiments" per method and pair; a sweep runs
such a table. Its folder SWEEP holds:

| path | what |
| --- | --- |
| ``sweep.json`` | the manifest: every cell (recipe, seed, run folder, its exact ``fastafd train`` command), the options shared by all cells, the sweep commands that made and continued it |
| ``runs/<cell>/`` | the cell's run folder, exactly what ``fastafd train --out`` writes (checkpoints, metrics.jsonl, ...) |
| ``logs/<cell>.log`` | the cell's console output, appended over its attempts |
| ``status/<cell>.json`` | what the executor recorded last: the cell's exit code, or that it was started or queued |
| ``slurm/`` | the Slurm executor's per-cell argument files, array submissions (``jobs.jsonl``) and Slurm's own logs |

A cell's run folder is fixed, so everything ``fastafd train`` does for one run holds for a cell:
started again, it resumes from its newest checkpoint, and its run lock refuses a second run of it.
Running the same sweep command again therefore skips finished cells and resumes unfinished ones.
A cell's state is read from its files, never from memory (:func:`cell_state`): **done** when
metrics.jsonl has its last epoch; **running** while its run lock is held (:func:`fastafd.runlock.holder`);
**failed** when the executor recorded a non-zero exit; **pending** otherwise (not started, stopped
and resumable, or queued on Slurm).

Executors: ``local`` runs the cells as child processes, one at a time or ``--parallel N`` at once; a
child is asked to stop (SIGTERM: checkpoint, exit 143) when the sweep process dies, so a killed sweep
leaves no orphan training. ``slurm`` submits one ``sbatch --array`` over the unfinished cells
(``slurm/sweep.sbatch``: each array task runs its cell through ``slurm/train.sbatch``), so a cell is
requeued and resumed exactly like a single job.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import fnmatch
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tyro.conf import Positional

from fastafd import grids, outputs, readback, rundir, runlock
from fastafd.args import PROG, parse_train_args, tyro_parse
from fastafd.errors import RunStopped, UserError

MANIFEST = rundir.SWEEP_MANIFEST
RUNS, LOGS, STATUS, SLURM = "runs", "logs", "status", "slurm"
SET_BY_SWEEP = ("out", "recipe", "system.seed")
"""``fastafd train`` options the sweep sets per cell (refused among the shared options)."""
ROOT = Path(__file__).resolve().parent.parent
"""The fastafd checkout (``slurm/`` and ``launch/`` live here)."""
DONE, RUNNING, FAILED, PENDING = "done", "running", "failed", "pending"


@dataclass
class SweepArgs:
    """Train a grid of recipes x seeds, each cell a run folder under one sweep folder (manifest: sweep.json). Options after `--` are `fastafd train` options applied to every cell, e.g. `-- --data /data/cifar100 --loop.epochs 30`. Run the same command again to continue: finished cells are skipped, unfinished ones resume from their checkpoints. `fastafd sweep status DIR` shows each cell's state; `fastafd report DIR` makes the tables."""

    recipes: tuple[str, ...] = ()
    """Recipe names or shell patterns matched against `fastafd recipes` (quote them: 'cifar100_resnet32_*')."""

    grid: str | None = None
    """A named grid instead of --recipes: claims-demo (the paper's four claims at demo size, minutes on a CPU) or claims-cifar100 (at the paper's scale)."""

    seeds: tuple[int, ...] | None = None
    """Seeds (--system.seed) of every recipe; default: the grid's, else 0. Runs with the same seed start from the same peer weights and read the same batches."""

    out: Path | None = None
    """The sweep folder; default sweeps/<grid, or the recipe patterns>."""

    config: Path | None = None
    """A `fastafd train --config` file (YAML or JSON) for every cell: each cell is its recipe's defaults, then the file's fields, then the options after `--` (the sweep sets recipe, seed and out)."""

    executor: Literal["local", "slurm"] = "local"
    """local: the cells as processes on this machine; slurm: one sbatch --array over the unfinished cells (slurm/sweep.sbatch)."""

    parallel: int = 0
    """Cells at a time. local: 0 or 1 is one after another, N > 1 runs N at once (each with cores / N threads); slurm: array tasks running at once (0: as many as Slurm allows)."""

    dry_run: bool = False
    """Print the cells and their commands (and the sbatch command), then exit without writing anything."""

    nodes: int = 1
    """slurm: nodes per cell (each runs launch/run.sh, as slurm/train.sbatch does)."""

    gpus_per_node: int = 1
    """slurm: GPUs per node of each cell (sbatch --gpus-per-node); 0 on a cluster without GPUs (CPU training)."""

    sbatch_args: str = ""
    """slurm: more sbatch options, one string, e.g. --sbatch_args='--partition gpu --time 1-00:00:00' (or SBATCH_* environment variables)."""


@dataclass
class StatusArgs:
    """Show the state of every cell of a sweep: done (its last epoch is in metrics.jsonl), running (its run lock is held), failed (a non-zero exit recorded), or pending."""

    sweep: Positional[Path]
    """Sweep folder written by `fastafd sweep`."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a recipe at a seed, with the sweep's shared options."""

    name: str
    """``<recipe>-seed<seed>``: the names of its run folder, log and status file."""
    recipe: str
    seed: int
    argv: tuple[str, ...]
    """``fastafd train`` arguments without ``--out`` (the run folder is added by :meth:`train_args`)."""
    method: str
    peers: tuple[str, ...]
    epochs: int
    """The run's ``loop.epochs``: the cell is done when metrics.jsonl has this epoch."""
    data: str
    """What the cell trains on (``demo``, ``synthetic``, or the data folder), for the report's table titles."""

    @property
    def run_dir(self) -> str:
        """The run folder, relative to the sweep folder."""
        return f"{RUNS}/{self.name}"

    def train_args(self, sweep: Path) -> list[str]:
        return [*self.argv, "--out", str(Path(sweep).resolve() / self.run_dir)]

    def command(self, sweep: Path) -> str:
        """The exact command that trains the cell (what a user would type to run it alone)."""
        return shlex.join([PROG, "train", *self.train_args(sweep)])

    def to_json(self, sweep: Path) -> dict:
        d = asdict(self)
        d["argv"], d["peers"] = list(self.argv), list(self.peers)
        return {**d, "run_dir": self.run_dir, "command": self.command(sweep)}

    @classmethod
    def from_json(cls, d: Mapping) -> Cell:
        """A cell from its manifest entry; ValueError naming the field that is missing or of the wrong type."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a {readback.type_name(d)}, not an object")
        return cls(name=readback.string(d, "name"), recipe=readback.string(d, "recipe"), seed=readback.integer(d, "seed", 0, 2**63 - 1),
                   argv=tuple(readback.strings(d, "argv")), method=readback.string(d, "method"), peers=tuple(readback.strings(d, "peers")),
                   epochs=readback.integer(d, "epochs", 1, readback.MAX_EPOCH), data=readback.string(d, "data"))


@dataclass(frozen=True)
class CellState:
    """Where a cell stands, read from its files."""

    state: str
    """done, running, failed or pending."""
    epochs_done: int
    """The last epoch in its metrics.jsonl (0: none)."""
    detail: str
    """Why (the lock holder, the exit code and the log's last line, the Slurm job, ...)."""


# -- the plan: which cells ---------------------------------------------------------------------------


def expand_recipes(patterns: Sequence[str], known: Sequence[str]) -> list[str]:
    """The recipes that ``patterns`` (names or shell patterns) name, in ``known``'s order per pattern, each once;
    a pattern that matches nothing is a one-line :class:`UserError` with close names."""
    out: list[str] = []
    for pattern in patterns:
        hits = [r for r in known if fnmatch.fnmatchcase(r, pattern)]
        if not hits:
            import difflib

            close = difflib.get_close_matches(pattern, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"`{PROG} recipes` lists them"
            raise UserError(f"--recipes {pattern} matches no recipe: {hint}")
        out += [r for r in hits if r not in out]
    return out


def data_label(cfg) -> str:
    """What a run trains on, for table titles: demo, synthetic, or ``<format> <folder name>``."""
    from fastafd.data import resolve_format

    fmt = resolve_format(cfg.data)
    if fmt in ("demo", "synthetic"):
        return fmt
    return f"{fmt} {Path(cfg.data.root).name}"


def _check_data(cfg, recipe: str) -> None:
    """A cell that would stop at its data does so now, in one line, before anything is written or submitted."""
    from fastafd.data import resolve_format

    if cfg.data.format == "synthetic":
        return
    if cfg.data.root is None:
        if cfg.data.format not in ("auto",):
            raise UserError(f"recipe {recipe} reads a dataset ({cfg.data.format}): pass its folder after --, e.g. "
                            f"{PROG} sweep ... -- --data /data/cifar-100-python")
        return
    if not Path(cfg.data.root).expanduser().exists():
        raise UserError(f"--data {cfg.data.root} does not exist (recipe {recipe}): pass the dataset folder")
    resolve_format(cfg.data)


def plan_cells(recipes: Sequence[str], seeds: Sequence[int], overrides: Sequence[str]) -> list[Cell]:
    """The cells of ``recipes`` x ``seeds``, each checked as ``fastafd train`` would check it (a bad shared option
    is a one-line :class:`UserError` here, not a failed cell later)."""
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in overrides if a.startswith("--")}
    if "print_config" in given:
        raise UserError("--print-config prints one config and trains nothing: run `fastafd train --recipe R --print-config` instead of a sweep")
    for name in SET_BY_SWEEP:
        if name in given:
            raise UserError(f"--{name} is set by the sweep for each cell: leave it out of the options after -- "
                            "(--out SWEEP names the sweep folder, --seeds the seeds)")
    cells = []
    for recipe in recipes:
        cfg = parse_train_args(["--recipe", recipe, *overrides])  # the seed and the run folder change no check
        _check_data(cfg, recipe)
        for seed in seeds:
            cells.append(Cell(name=f"{recipe}-seed{seed}", recipe=recipe, seed=seed,
                              argv=("--recipe", recipe, "--system.seed", str(seed), *overrides), method=cfg.method.name,
                              peers=tuple(cfg.model.peers), epochs=cfg.loop.epochs, data=data_label(cfg)))
    return cells


def default_out(grid: str | None, patterns: Sequence[str]) -> Path:
    """``sweeps/<grid>`` or ``sweeps/<patterns>``: the same command names the same folder, so running it again continues it."""
    slug = grid or "+".join(patterns).replace("*", "all").replace("?", "any")
    return Path("sweeps") / (re.sub(r"[^\w.+-]+", "-", slug).strip("-_") or "sweep")


def merge(manifest: Mapping | None, cells: Sequence[Cell], *, overrides: Sequence[str], grid: str | None, sweep: Path,
          command: str, executor: str) -> dict:
    """The manifest after this command: the earlier cells (in their order: the Slurm array indexes), then its new
    ones. A sweep folder made with other shared options, or a cell whose command differs, is refused."""
    now = dt.datetime.now().isoformat(timespec="seconds")
    entry = {"command": command, "executor": executor, "time": now}
    if manifest is None:
        return {"version": 1, "grid": grid, "overrides": list(overrides), "command": command, "history": [entry],
                "cells": [c.to_json(sweep) for c in cells]}
    if list(manifest.get("overrides", [])) != list(overrides):
        raise UserError(f"{sweep} is a sweep with the shared options {shlex.join(manifest.get('overrides', [])) or '(none)'}, "
                        f"not {shlex.join(overrides) or '(none)'}: pass another --out for a sweep with other options")
    known = {c["name"]: c for c in manifest["cells"]}
    out = dict(manifest)
    out["cells"] = list(manifest["cells"])
    for cell in cells:
        if cell.name in known:
            if tuple(known[cell.name]["argv"]) != cell.argv:
                raise UserError(f"cell {cell.name} of {sweep} was made with `{shlex.join(known[cell.name]['argv'])}`, "
                                f"not `{shlex.join(cell.argv)}`: pass another --out")
            continue
        out["cells"].append(cell.to_json(sweep))
    out["grid"] = manifest.get("grid") or grid
    out["command"] = command
    out["history"] = [*manifest.get("history", []), entry]
    return out


def load_manifest(sweep: Path) -> dict:
    """The manifest of the sweep folder ``sweep``, typed (:func:`check_manifest`); a folder that is not one, or a damaged
    manifest, is a one-line :class:`UserError` naming the file and the field."""
    path = Path(sweep) / MANIFEST
    if not path.is_file():
        what = "does not exist" if not Path(sweep).exists() else f"has no {MANIFEST}"
        if (Path(sweep) / rundir.CONFIG_FILE).is_file():
            what = f"is a run folder (it has {rundir.CONFIG_FILE}), not a sweep folder"
        raise UserError(f"{sweep} {what}: pass a sweep folder written by `{PROG} sweep`")
    fix = f"restore it, or pass a sweep folder written by `{PROG} sweep`"
    manifest = readback.read_json(path, fix)
    try:
        check_manifest(manifest)
    except ValueError as e:
        raise readback.Damaged(f"{path}: {e}: {fix}") from None
    return manifest


def check_manifest(manifest: Mapping) -> None:
    """ValueError naming the first field of a manifest that is missing or of the wrong type."""
    names = set()
    for i, c in enumerate(readback.objects(manifest, "cells")):
        try:
            cell = Cell.from_json(c)
        except ValueError as e:
            raise ValueError(f"cells[{i}]: {e}") from None
        if not re.fullmatch(r"[\w.+-]+", cell.name) or cell.name in names:
            raise ValueError(f"cells[{i}]: 'name' {cell.name!r} is not a cell name (letters, digits, . + - _; once each)")
        names.add(cell.name)
    readback.strings(manifest, "overrides", default=[])
    history = manifest.get("history", [])
    if not isinstance(history, list):
        raise ValueError(f"'history' is a {readback.type_name(history)}, not a list")
    grid = manifest.get("grid")
    if grid is not None and not isinstance(grid, str):
        raise ValueError(f"'grid' is a {readback.type_name(grid)}, not a string")


def cells_of(manifest: Mapping) -> list[Cell]:
    return [Cell.from_json(c) for c in manifest["cells"]]


def check_layout(sweep: Path) -> None:
    """Refuse a sweep folder whose sub-folders are files (a hand-edited folder), or a run folder, before anything is written."""
    sweep = Path(sweep)
    if (sweep / rundir.CONFIG_FILE).exists() and not (sweep / MANIFEST).exists():
        raise UserError(f"--out {sweep} is a run folder (it has {rundir.CONFIG_FILE}), not a sweep folder: pass another --out, "
                        "e.g. --out sweeps/my-sweep")
    for name in (RUNS, LOGS, STATUS, SLURM):
        if (sweep / name).exists() and not (sweep / name).is_dir():
            raise UserError(f"{sweep / name} is a file, where the sweep keeps its {name} folder: move it away, then run the same command again")


# -- a cell's state, from its files ------------------------------------------------------------------


def epochs_done(run_dir: Path) -> int:
    """The last epoch in ``run_dir/metrics.jsonl`` (0 when there is none; damaged lines, a torn last one too, are skipped)."""
    return _epochs(_metrics(run_dir))


def _metrics(run_dir: Path) -> readback.Lines | None:
    try:
        return readback.metrics_or_none(Path(run_dir) / rundir.METRICS_FILE)
    except readback.Damaged:
        return None


def _epochs(lines: readback.Lines | None) -> int:
    return max((r["epoch"] for r in lines.rows), default=0) if lines else 0


def damage(lines: readback.Lines | None) -> str:
    """``damaged metrics.jsonl: FILE:LINE: why (and N more)``, or "" for a whole file."""
    if not lines or not lines.damaged:
        return ""
    more = len(lines.damaged) - 1
    return f"damaged {rundir.METRICS_FILE}, line skipped: {lines.damaged[0]}" + (f" (and {more} more)" if more else "")


def read_status(sweep: Path, cell: Cell) -> dict:
    """What the executor recorded for ``cell`` (``{}``: nothing yet, or a damaged record)."""
    try:
        return readback.read_json(Path(sweep) / STATUS / f"{cell.name}.json")
    except readback.Damaged:
        return {}


def write_status(sweep: Path, cell: Cell, record: dict) -> None:
    (Path(sweep) / STATUS).mkdir(parents=True, exist_ok=True)
    rundir.write_json(Path(sweep) / STATUS / f"{cell.name}.json", record)


def describe_exit(code: int) -> str:
    """An exit code in words: fastafd's conventions (2 a mistake, 1 an error, 143 SIGTERM), or the killing signal."""
    if code < 0 or code > 128:
        try:
            name = signal.Signals(-code if code < 0 else code - 128).name
        except ValueError:
            name = f"signal {abs(code)}"
        return f"exit {code}, {'stopped on' if code == 128 + signal.SIGTERM else 'killed by'} {name}"
    return {1: "exit 1, an error", 2: "exit 2, a mistake in its options or data"}.get(code, f"exit {code}")


def last_line(path: Path) -> str:
    """The log's last non-empty line (a fastafd error is one line), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def cell_state(sweep: Path, cell: Cell, queued: Mapping[str, str] | None = None) -> CellState:
    """Done, running, failed or pending, from the cell's run folder, run lock and recorded exit (``queued``: cell name ->
    its Slurm job and state, from :func:`slurm_queue`)."""
    run = Path(sweep) / cell.run_dir
    held = runlock.holder(run)
    lines = _metrics(run)
    last, damaged = _epochs(lines), damage(lines)
    if held:
        return CellState(RUNNING, last, f"lock held by {held}" + (f"; {damaged}" if damaged else ""))
    if last >= cell.epochs:
        return CellState(DONE, last, damaged)
    if queued and cell.name in queued:  # before a recorded exit: a requeued task's last exit was its preemption
        return CellState(PENDING, last, f"in the Slurm queue: {queued[cell.name]}")
    status = read_status(sweep, cell)
    code = status.get("exit")
    if isinstance(code, int) and code != 0:
        line = last_line(Path(sweep) / LOGS / f"{cell.name}.log")
        return CellState(FAILED, last, describe_exit(code) + (f": {line}" if line else ""))
    if not run.exists():
        return CellState(PENDING, last, "not started")
    return CellState(PENDING, last, f"stopped after epoch {last}: resumes when the sweep runs again" if last else "stopped before its first epoch")


def states(sweep: Path, cells: Sequence[Cell]) -> dict[str, CellState]:
    queued = slurm_queue(sweep)
    return {c.name: cell_state(sweep, c, queued) for c in cells}


# -- the local executor ---------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's ``prctl``, looked up in the parent (a ``dlopen`` between fork and exec could wait forever on a lock
    another thread held at the fork); None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _stop_with_parent(prctl, parent: int) -> None:
    """``preexec_fn`` of a cell: the kernel sends it SIGTERM (checkpoint, exit 143) when the sweep process dies,
    however it dies (SIGKILL too), instead of leaving it training unwatched. Linux only; elsewhere a no-op."""
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the sweep died between fork and prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _final_top1(sweep: Path, cell: Cell) -> str:
    try:
        row = rundir.read_metrics(Path(sweep) / cell.run_dir)[-1]
        return f"ensemble top-1 {row['ensemble_top1']:.2f}"
    except (UserError, KeyError, IndexError, TypeError):
        return ""


def run_local(sweep: Path, cells: Sequence[Cell], parallel: int) -> dict[str, CellState]:
    """Train the cells that are not done as child processes, ``parallel`` at once; returns every cell's final state."""
    parallel = max(1, parallel)
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, _cores() // parallel))
    (sweep / LOGS).mkdir(parents=True, exist_ok=True)
    todo, width = [], len(str(len(cells)))
    for i, cell in enumerate(cells, 1):
        st = cell_state(sweep, cell)
        tag = f"[{i:>{width}}/{len(cells)}] {cell.name}"
        if st.state == DONE:
            print(f"{tag}: done, skipped", flush=True)
        elif st.state == RUNNING:
            print(f"{tag}: running elsewhere ({st.detail}), skipped", flush=True)
        else:
            todo.append((tag, cell, st))
    running: dict[subprocess.Popen, tuple[str, Cell, float]] = {}
    prctl = _prctl()
    try:
        while todo or running:
            while todo and len(running) < parallel:
                tag, cell, st = todo.pop(0)
                if (held := runlock.holder(sweep / cell.run_dir)) is not None:  # taken since the first look
                    print(f"{tag}: running elsewhere (lock held by {held}), skipped", flush=True)
                    continue
                log = sweep / LOGS / f"{cell.name}.log"
                with open(log, "ab") as f:
                    f.write(f"\n== {dt.datetime.now().isoformat(timespec='seconds')} {cell.command(sweep)}\n".encode())
                    proc = subprocess.Popen([sys.executable, "-m", "fastafd.cli", "train", *cell.train_args(sweep)], stdin=subprocess.DEVNULL,
                                            stdout=f, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=functools.partial(_stop_with_parent, prctl, os.getpid()))
                write_status(sweep, cell, {"started": dt.datetime.now().isoformat(timespec="seconds"), "pid": proc.pid,
                                           "host": socket.gethostname(), "executor": "local", "load_start": _load()})
                resumes = "resumes" if st.epochs_done or (sweep / cell.run_dir / "checkpoints").is_dir() else "starts"
                print(f"{tag}: {resumes} (pid {proc.pid}, log {log})", flush=True)
                running[proc] = (tag, cell, time.monotonic())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                tag, cell, started = running.pop(proc)
                _record_exit(sweep, cell, proc.returncode, started, proc.pid)
                st = cell_state(sweep, cell)
                what = f"done in {time.monotonic() - started:.0f} s, {_final_top1(sweep, cell)}" if st.state == DONE else f"{st.state}: {st.detail}"
                print(f"{tag}: {what}", flush=True)
    except KeyboardInterrupt:  # the cells got the SIGINT too (same process group): let them stop, record them
        for proc, (_, cell, started) in running.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
            _record_exit(sweep, cell, proc.returncode if proc.returncode is not None else 130, started, proc.pid)
        raise
    return {c.name: cell_state(sweep, c) for c in cells}


def _load() -> float | None:
    """The 1-minute load average (how busy the machine was while a cell ran: the report prints the range)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _record_exit(sweep: Path, cell: Cell, code: int, started: float, pid: int) -> None:
    begun = read_status(sweep, cell)
    write_status(sweep, cell, {"exit": code, "started": begun.get("started"), "ended": dt.datetime.now().isoformat(timespec="seconds"),
                               "seconds": round(time.monotonic() - started, 1), "pid": pid, "host": socket.gethostname(),
                               "executor": "local", "load_start": begun.get("load_start"), "load_end": _load()})


# -- the Slurm executor ---------------------------------------------------------------------------


def array_spec(indexes: Sequence[int]) -> str:
    """``sbatch --array`` ranges: [0, 1, 2, 5, 7, 8] -> ``0-2,5,7-8``."""
    parts, run = [], []
    for i in sorted(indexes):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def cell_file(cell: Cell, sweep: Path) -> str:
    """What ``slurm/sweep.sbatch`` sources for its array task: the cell's name, run folder and train arguments."""
    run = Path(sweep).resolve() / cell.run_dir
    comment = cell.command(sweep).replace("\r", "\\r").replace("\n", "\\n")  # one comment line, whatever the arguments hold
    return (f"# {comment}\nCELL={shlex.quote(cell.name)}\nRUN_DIR={shlex.quote(str(run))}\n"
            f"ARGS=({' '.join(shlex.quote(a) for a in cell.argv)})\n")


def sbatch_command(sweep: Path, indexes: Sequence[int], args: SweepArgs) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--array={array_spec(indexes)}{f'%{args.parallel}' if args.parallel > 0 else ''}",
           f"--job-name=fastafd-sweep-{Path(sweep).resolve().name}", f"--nodes={args.nodes}",
           f"--output={Path(sweep).resolve() / SLURM / '%A_%a.out'}"]
    if args.gpus_per_node > 0:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    return [*cmd, *shlex.split(args.sbatch_args), str(ROOT / "slurm" / "sweep.sbatch")]


def slurm_queue(sweep: Path, strict: bool = False) -> dict[str, str]:
    """Cell name -> ``job <array job>_<index> <STATE>`` for the sweep's array tasks still in the Slurm queue
    (``{}`` without submissions, without squeue, or when Slurm has forgotten the jobs). ``strict`` (before a
    submission): squeue failing otherwise (a busy controller) stops the command, since "not in the queue" would
    submit queued cells again."""
    path = Path(sweep) / SLURM / "jobs.jsonl"
    if not path.is_file() or not shutil.which("squeue"):
        return {}
    out: dict[str, str] = {}
    try:
        jobs = readback.read_jsonl(path).rows  # a damaged line is skipped
    except readback.Damaged:
        return {}
    for job in jobs:
        try:
            names = {int(i): n for i, n in job["cells"].items()}
            proc = subprocess.run(["squeue", "-h", "-r", "-j", str(job["job"]), "-o", "%i %T"], capture_output=True, text=True, timeout=30)
        except (ValueError, KeyError, TypeError, OSError, subprocess.SubprocessError) as e:
            if strict and isinstance(e, (OSError, subprocess.SubprocessError)):
                raise RunStopped(f"squeue could not be asked about job {job.get('job')} ({e}): nothing submitted; "
                                 "run the same command again when Slurm answers") from None
            continue
        if strict and proc.returncode != 0 and "invalid job id" not in proc.stderr.lower():
            raise RunStopped(f"squeue failed for job {job['job']} ({proc.stderr.strip() or f'exit {proc.returncode}'}): "
                             "nothing submitted; run the same command again when Slurm answers")
        for entry in proc.stdout.splitlines() if proc.returncode == 0 else []:
            task, _, state = entry.partition(" ")
            job_id, _, index = task.partition("_")
            if index.isdigit() and int(index) in names:
                out[names[int(index)]] = f"job {task} {state.strip()}"
    return out


def check_slurm() -> None:
    """What the Slurm executor needs, checked before the sweep writes anything: sbatch, and the checkout's scripts."""
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm needs sbatch on PATH: run on a Slurm login node, or use --executor local")
    if not (ROOT / "slurm" / "sweep.sbatch").is_file() or not (ROOT / "launch" / "run.sh").is_file():
        raise UserError(f"--executor slurm runs slurm/sweep.sbatch and launch/run.sh of a fastafd checkout, and {ROOT} is none: "
                        "install fastafd from a clone (pip install -e .), on a file system the nodes share")


def submit_slurm(sweep: Path, cells: Sequence[Cell], args: SweepArgs) -> int:
    """One ``sbatch --array`` over the cells that are neither done, running nor already queued; returns 0."""
    queued = slurm_queue(sweep, strict=True)
    todo = []
    for i, cell in enumerate(cells):
        st = cell_state(sweep, cell, queued)
        if st.state == DONE or st.state == RUNNING or cell.name in queued:
            print(f"{cell.name}: {st.state}{f' ({st.detail})' if st.detail else ''}, not submitted", flush=True)
        else:
            todo.append(i)
    if not todo:
        print(f"nothing to submit: every cell is done, running or queued (`{PROG} sweep status {sweep}`)")
        return 0
    (sweep / SLURM / "cells").mkdir(parents=True, exist_ok=True)
    (sweep / LOGS).mkdir(parents=True, exist_ok=True)
    for i in todo:
        (sweep / SLURM / "cells" / f"{i}.sh").write_text(cell_file(cells[i], sweep))
    cmd = sbatch_command(sweep, todo, args)
    env = {**os.environ, "FASTAFD_SWEEP": str(sweep.resolve()), "FASTAFD_ROOT": str(ROOT)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise RunStopped(f"sbatch did not run ({e}): nothing was submitted; run the same command again") from None
    if proc.returncode != 0:
        why = " ".join(proc.stderr.split())[-400:] or f"exit {proc.returncode}"
        raise RunStopped(f"sbatch refused the array ({why}): nothing was submitted; fix it (e.g. --gpus_per_node 0 on a cluster "
                         "without GPUs, --sbatch_args for a partition), then run the same command again")
    job = proc.stdout.strip().split(";")[0]
    rundir.append_jsonl(sweep / SLURM / "jobs.jsonl", {"job": job, "cells": {str(i): cells[i].name for i in todo},
                                                       "command": shlex.join(cmd), "submitted": dt.datetime.now().isoformat(timespec="seconds")})
    for i in todo:
        write_status(sweep, cells[i], {"queued": f"{job}_{i}", "executor": "slurm",
                                       "submitted": dt.datetime.now().isoformat(timespec="seconds")})
    print(f"submitted job {job}: an array of {len(todo)} cells (tasks {array_spec(todo)}); logs in {sweep / LOGS}; "
          f"follow it with `{PROG} sweep status {sweep}`")
    return 0


# -- the commands ---------------------------------------------------------------------------------


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The sweep's own options, and the ``fastafd train`` options after ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _absolute_config(argv: Sequence[str]) -> list[str]:
    """``argv`` with the path of ``--config FILE`` made absolute: a cell may run in another folder (Slurm)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(Path(out[i + 1]).expanduser().resolve())
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(Path(arg.split("=", 1)[1]).expanduser().resolve())
    return out


def cmd_sweep(argv: Sequence[str]) -> int:
    if argv and argv[0] == "status":
        return cmd_status(argv[1:])
    own, overrides = _split(argv)
    outputs.refuse_empty(own)
    args: SweepArgs = tyro_parse(SweepArgs, own, prog=f"{PROG} sweep", description=SweepArgs.__doc__ or "")  # type: ignore[assignment]
    grid = grids.get(args.grid) if args.grid else None
    if grid and args.recipes:
        raise UserError("--grid and --recipes both name the recipes: pass one of them")
    if not grid and not args.recipes:
        raise UserError(f"name the cells: --recipes NAME_OR_PATTERN ... (see `{PROG} recipes`) or --grid {' | '.join(grids.GRIDS)}")
    if args.parallel < 0 or args.nodes < 1 or args.gpus_per_node < 0:
        raise UserError("--parallel and --gpus_per_node must be >= 0, --nodes >= 1")
    if args.out is not None and not str(args.out).strip():
        raise UserError("--out is empty: give the sweep folder, e.g. --out sweeps/my-sweep")
    if args.executor == "local" and (args.nodes != 1 or args.sbatch_args):
        raise UserError("--nodes and --sbatch_args are for --executor slurm")
    try:
        shlex.split(args.sbatch_args)
    except ValueError as e:
        raise UserError(f"--sbatch_args {args.sbatch_args!r}: {e}; quote it as one shell string, e.g. --sbatch_args='--partition gpu'") from None
    from fastafd import recipes as recipe_book

    names = list(grid.recipes) if grid else expand_recipes(args.recipes, list(recipe_book.RECIPES))
    seeds = tuple(args.seeds) if args.seeds is not None else (grid.seeds if grid else (0,))
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0, e.g. --seeds 0 1 2")
    given = ["--config", str(args.config)] if args.config is not None else []
    shared = _absolute_config([*given, *(grid.overrides if grid else ()), *overrides])
    cells = plan_cells(names, seeds, shared)
    sweep = Path(args.out) if args.out is not None else default_out(args.grid, args.recipes)
    if sweep.exists() and not sweep.is_dir():
        raise UserError(f"--out {sweep} is a file: pass a folder for the sweep")
    check_layout(sweep)
    command = shlex.join([PROG, "sweep", *argv])

    def planned() -> tuple[dict, list[Cell], bool]:
        existing = load_manifest(sweep) if (sweep / MANIFEST).exists() else None
        manifest = merge(existing, cells, overrides=shared, grid=args.grid, sweep=sweep, command=command, executor=args.executor)
        return manifest, cells_of(manifest), existing is not None

    if args.dry_run:
        _, all_cells, existing = planned()
        return _print_plan(sweep, all_cells, args, existing)
    planned()  # a manifest that does not fit is refused before anything is written
    if args.executor == "slurm":
        check_slurm()
    with runlock.RunLock(sweep):  # one sweep command per folder at a time (a cell has its own run lock)
        manifest, all_cells, _ = planned()  # read again under the lock: another sweep command may have extended it
        rundir.write_json(sweep / MANIFEST, manifest)
        if args.executor == "slurm":
            return submit_slurm(sweep, all_cells, args)
        final = run_local(sweep, all_cells, args.parallel)
    return _summary(sweep, final)


def _print_plan(sweep: Path, cells: Sequence[Cell], args: SweepArgs, existing: bool) -> int:
    print(f"sweep {sweep} ({'continued' if existing else 'new'}): {len(cells)} cells, executor {args.executor}; nothing written (--dry_run)")
    st = states(sweep, cells) if existing else {}
    for i, cell in enumerate(cells):
        state = st[cell.name].state if cell.name in st else PENDING
        print(f"  [{i}] {cell.name} ({state}): {cell.command(sweep)}")
    if args.executor == "slurm":
        todo = [i for i, c in enumerate(cells) if (st[c.name].state if c.name in st else PENDING) in (PENDING, FAILED)]
        if todo:
            print("  " + shlex.join(sbatch_command(sweep, todo, args)))
    return 0


def _summary(sweep: Path, final: Mapping[str, CellState]) -> int:
    counts = {s: [n for n, st in final.items() if st.state == s] for s in (DONE, RUNNING, FAILED, PENDING)}
    print(f"sweep {sweep}: " + ", ".join(f"{len(v)} {k}" for k, v in counts.items() if v) + f" of {len(final)} cells")
    if len(counts[DONE]) == len(final):
        print(f"tables: {PROG} report {sweep}")
        return 0
    parts = [f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in counts.items() if v and k != DONE]
    raise RunStopped(f"sweep {sweep}: {len(counts[DONE])} of {len(final)} cells done; {'; '.join(parts)}: see {sweep / LOGS}/<cell>.log "
                     "and run the same command again (finished cells are skipped, unfinished ones resume)")


def cmd_status(argv: Sequence[str]) -> int:
    args: StatusArgs = tyro_parse(StatusArgs, argv, prog=f"{PROG} sweep status", description=StatusArgs.__doc__ or "")  # type: ignore[assignment]
    manifest = load_manifest(args.sweep)
    cells = cells_of(manifest)
    st = states(args.sweep, cells)
    counts = {s: sum(1 for v in st.values() if v.state == s) for s in (DONE, RUNNING, FAILED, PENDING)}
    print(f"sweep {args.sweep}: {len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    width = max(len(c.name) for c in cells)
    for cell in cells:
        s = st[cell.name]
        print(f"  {cell.name:<{width}}  {s.state:<7}  epoch {s.epochs_done}/{cell.epochs}" + (f"  {s.detail}" if s.detail else ""))
    return 0
