"""A sweep's plan: its cells (recipes x seeds x shared options), the manifest ``sweep.json`` and the folder's layout."""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fastafd.args import PROG, parse_train_args
from fastafd.errors import UserError
from fastafd.run import readback, rundir

MANIFEST = rundir.SWEEP_MANIFEST
RUNS, LOGS, STATUS, SLURM = "runs", "logs", "status", "slurm"
SET_BY_SWEEP = ("out", "recipe", "system.seed")
"""``fastafd train`` options the sweep sets per cell (refused among the shared options)."""


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
