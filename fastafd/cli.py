"""The ``fastafd`` command: train, eval, recipes, sweep, report, ...

Options of ``train`` are generated from the config dataclasses by tyro (``--help`` lists every field
with its docstring). Two conveniences sit in front of it: ``--recipe NAME`` picks the defaults, and
``--data DIR`` is short for ``--data.root DIR``. User mistakes end with one line on stderr and exit 2.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tyro.conf import Positional

from fastafd.args import PROG, parse_train_args, tyro_parse, wants_print_config
from fastafd.errors import RunStopped, Stopped, UserError
from fastafd.run import atomic, outputs

__all__ = ["main"]


# -- commands -------------------------------------------------------------------------------------


def cmd_train(argv: Sequence[str]) -> int:
    outputs.refuse_empty(argv)
    cfg = parse_train_args(argv)
    if wants_print_config(argv):
        from fastafd.configfile import dump_yaml

        sys.stdout.write(dump_yaml(cfg))
        return 0

    from fastafd.trainer import train

    run_dir = train(cfg)
    if run_dir is not None and os.environ.get("RANK", "0") == "0":  # None: dry run; one line per job, not per rank
        print(f"run directory: {run_dir}")
    return 0


@dataclass
class EvalArgs:
    """Evaluate a trained run on its validation split (or on another dataset folder)."""

    run: Positional[Path]
    """Run directory written by `fastafd train`."""

    data: Path | None = None
    """Dataset to evaluate on, in any format `fastafd train --data` reads (detected the same way); default: the run's own."""

    batch_size: int = 0
    """Global evaluation batch size; 0 keeps the run's."""

    checkpoint: str = "best"
    """Which weights: best (best.json: the best ensemble top-1 of the evaluated epochs; the newest if none), latest, or a checkpoint folder."""


def cmd_eval(argv: Sequence[str]) -> int:
    from fastafd.evaluate import evaluate_run

    args = tyro_parse(EvalArgs, argv, prog=f"{PROG} eval", description=EvalArgs.__doc__ or "")
    print(json.dumps(evaluate_run(args.run, data=args.data, batch_size=args.batch_size, which=args.checkpoint), indent=2))
    return 0


def cmd_recipes(argv: Sequence[str]) -> int:
    from fastafd import recipes

    if argv:
        raise UserError(f"`{PROG} recipes` takes no arguments (got {' '.join(argv)})")
    width = max(map(len, recipes.RECIPES))
    for name in recipes.RECIPES:
        print(f"{name:<{width}}  {recipes.describe(name)}")
    return 0


def cmd_methods(argv: Sequence[str]) -> int:
    from fastafd.methods import registry

    if argv:
        raise UserError(f"`{PROG} methods` takes no arguments (got {' '.join(argv)})")
    for line in registry.describe():
        print(line)
    return 0


@dataclass
class PlotArgs:
    """Write PNG training curves of one or more runs (several runs are overlaid, labelled by folder and method)."""

    runs: Positional[tuple[Path, ...]]
    """Run directories written by `fastafd train`."""

    out: Path | None = None
    """Folder for the PNGs (top1, losses, discriminator, throughput); default: <first run>/plots. Never over a file fastafd did not write."""


def cmd_plot(argv: Sequence[str]) -> int:
    from fastafd.experiments.plot import plot_runs

    outputs.refuse_empty(argv)
    args = tyro_parse(PlotArgs, argv, prog=f"{PROG} plot", description=PlotArgs.__doc__ or "")
    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0


@dataclass
class ExportArgs:
    """Export one trained peer as a plain timm state dict (safetensors) from a run's checkpoint (default: its best)."""

    run: Positional[Path]
    """Run directory written by `fastafd train`."""

    peer: int = 0
    """Index of the peer to export (0-based, in --model.peers order)."""

    out: Path = Path("peer.safetensors")
    """Output file (.safetensors), or a folder for peer<K>.safetensors; an existing file is replaced only when fastafd wrote it."""

    checkpoint: str = "best"
    """Which weights: best (best.json: the best ensemble top-1 of the evaluated epochs; the newest if none), latest, or a checkpoint folder."""


def cmd_export(argv: Sequence[str]) -> int:
    from fastafd.export import export_peer

    outputs.refuse_empty(argv)
    args = tyro_parse(ExportArgs, argv, prog=f"{PROG} export", description=ExportArgs.__doc__ or "")
    print(json.dumps(export_peer(args.run, args.peer, args.out, which=args.checkpoint), indent=2))
    return 0


def cmd_data(argv: Sequence[str]) -> int:
    from fastafd.data_commands import cmd_data as run

    return run(argv)


def cmd_sweep(argv: Sequence[str]) -> int:
    from fastafd.experiments.sweep import cmd_sweep as run

    return run(argv)


def cmd_report(argv: Sequence[str]) -> int:
    from fastafd.experiments.report import cmd_report as run

    return run(argv)


def cmd_bench(argv: Sequence[str]) -> int:
    outputs.refuse_empty(argv)
    from fastafd.bench import cmd_bench as run

    return run(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (cmd_train, "train peers (default: the demo recipe on built-in data)"),
    "eval": (cmd_eval, "evaluate a run directory"),
    "recipes": (cmd_recipes, "list the named recipes"),
    "methods": (cmd_methods, "list the methods (--method.name) with what each does"),
    "data": (cmd_data, "pack a folder into webdataset shards; verify a dataset"),
    "plot": (cmd_plot, "write PNG training curves of one or more runs"),
    "export": (cmd_export, "export one trained peer as a timm state dict"),
    "sweep": (cmd_sweep, "train a grid of recipes x seeds (local or Slurm array); `sweep status DIR` shows its cells"),
    "report": (cmd_report, "tables of a sweep's results: mean +- std over seeds per method and pair (Markdown, CSV, JSON, PNG)"),
    "bench": (cmd_bench, "throughput benchmarks (fastafd bench step)"),
}


def usage() -> str:
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _fail(line: str, code: int) -> int:
    """Print the one line (rank 0 only, when several processes run under ``fastafd.launch``, which reports the
    others' lines itself: one line per run instead of one per rank) and return the exit code."""
    from fastafd.launch import record_error

    rank0 = os.environ.get("RANK", "0") == "0"
    if not record_error(line, code, printed=rank0) or rank0:
        print(line, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    mark = _temp_files_mark()
    try:
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            raise UserError(f"unknown command '{name}'{f': did you mean {close[0]}?' if close else ''} Commands: {', '.join(COMMANDS)}")
        return COMMANDS[name][0](rest)
    except (UserError, RunStopped) as e:
        return _fail(f"{PROG}: error: {e}", e.exit_code)
    except Stopped as e:
        return _fail(f"{PROG}: {e}", e.exit_code)
    except OSError as e:
        gone = Path(str(e.filename)).parent if e.errno == errno.ENOENT and e.filename else None
        if gone is not None and not gone.exists():  # e.g. a run folder deleted while its run (a sweep's cell) trains
            return _fail(f"{PROG}: error: {gone} disappeared while the command ran (deleted or moved): restore it, or run the same "
                         "command again (a run resumes from its newest checkpoint, if one is left)", 1)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        return _fail(f"{PROG}: error: {atomic.describe(e.errno)}{where}: free space (or fix the file system), then run the same command "
                     "again (a run resumes from its last checkpoint)", 1)
    except KeyboardInterrupt:
        from fastafd.errors import ERROR_DIR

        if not os.environ.get(ERROR_DIR) and os.environ.get("RANK", "0") == "0":  # under fastafd.launch, the launcher says it once
            print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        _release_temp_files(mark)


def _temp_files_mark() -> int:
    shards = sys.modules.get("fastafd.data.shards")
    return shards.temp_index_count() if shards is not None else 0


def _release_temp_files(mark: int) -> None:
    """Delete what this command put in the temp folder (the shard readers' filtered indexes), on
    every way out of ``main``, not only at interpreter exit (in-process callers, a stopped run)."""
    shards = sys.modules.get("fastafd.data.shards")
    if shards is not None:
        shards.remove_temp_indexes(since=mark)


if __name__ == "__main__":
    sys.exit(main())

