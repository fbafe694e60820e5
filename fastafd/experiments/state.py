"""A cell's state, read from its files, never from memory: **done** when metrics.jsonl has its last epoch;
**running** while its run lock is held (:func:`fastafd.run.runlock.holder`); **failed** when the executor
recorded a non-zero exit; **pending** otherwise (not started, stopped and resumable, or queued on Slurm)."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fastafd.experiments.plan import LOGS, STATUS, Cell
from fastafd.run import readback, rundir, runlock

DONE, RUNNING, FAILED, PENDING = "done", "running", "failed", "pending"


@dataclass(frozen=True)
class CellState:
    """Where a cell stands, read from its files."""

    state: str
    """done, running, failed or pending."""
    epochs_done: int
    """The last epoch in its metrics.jsonl (0: none)."""
    detail: str
    """Why (the lock holder, the exit code and the log's last line, the Slurm job, ...)."""


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
    its Slurm job and state, from :func:`fastafd.experiments.slurm.slurm_queue`)."""
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
