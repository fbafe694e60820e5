"""The Slurm executor: one ``sbatch --array`` over the unfinished cells (``slurm/sweep.sbatch``: each array task runs
its cell through ``slurm/train.sbatch``), so a cell is requeued and resumed exactly like a single job."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastafd.args import PROG
from fastafd.errors import RunStopped, UserError
from fastafd.experiments.plan import LOGS, SLURM, Cell
from fastafd.experiments.state import DONE, RUNNING, cell_state, write_status
from fastafd.run import readback, rundir

if TYPE_CHECKING:
    from fastafd.experiments.sweep import SweepArgs

ROOT = Path(__file__).resolve().parents[2]
"""The fastafd checkout (``slurm/`` and ``launch/`` live here)."""


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
