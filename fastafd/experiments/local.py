"""The local executor: the cells as child processes of the sweep command, one at a time or ``--parallel N`` at once;
a child is asked to stop (SIGTERM: checkpoint, exit 143) when the sweep process dies, so a killed sweep leaves no
orphan training."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fastafd.errors import UserError
from fastafd.experiments.plan import LOGS, Cell
from fastafd.experiments.state import DONE, RUNNING, CellState, cell_state, read_status, write_status
from fastafd.run import rundir, runlock

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
