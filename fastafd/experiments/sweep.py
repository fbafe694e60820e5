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
A cell's state is read from its files, never from memory (:func:`fastafd.experiments.state.cell_state`): **done** when
metrics.jsonl has its last epoch; **running** while its run lock is held (:func:`fastafd.run.runlock.holder`);
**failed** when the executor recorded a non-zero exit; **pending** otherwise (not started, stopped
and resumable, or queued on Slurm).

Executors: ``local`` runs the cells as child processes, one at a time or ``--parallel N`` at once; a
child is asked to stop (SIGTERM: checkpoint, exit 143) when the sweep process dies, so a killed sweep
leaves no orphan training. ``slurm`` submits one ``sbatch --array`` over the unfinished cells
(``slurm/sweep.sbatch``: each array task runs its cell through ``slurm/train.sbatch``), so a cell is
requeued and resumed exactly like a single job.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tyro.conf import Positional

from fastafd.args import PROG, tyro_parse
from fastafd.errors import RunStopped, UserError
from fastafd.experiments import grids
from fastafd.experiments.local import run_local
from fastafd.experiments.plan import (
    LOGS,
    MANIFEST,
    Cell,
    cells_of,
    check_layout,
    default_out,
    expand_recipes,
    load_manifest,
    merge,
    plan_cells,
)
from fastafd.experiments.slurm import check_slurm, sbatch_command, slurm_queue, submit_slurm
from fastafd.experiments.state import DONE, FAILED, PENDING, RUNNING, CellState, cell_state
from fastafd.run import outputs, rundir, runlock


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


def states(sweep: Path, cells: Sequence[Cell]) -> dict[str, CellState]:
    queued = slurm_queue(sweep)
    return {c.name: cell_state(sweep, c, queued) for c in cells}


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
