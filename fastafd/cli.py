"""The ``fastafd`` command: train, eval, recipes.

Options of ``train`` are generated from the config dataclasses by tyro (``--help`` lists every field
with its docstring). Two conveniences sit in front of it: ``--recipe NAME`` picks the defaults, and
``--data DIR`` is short for ``--data.root DIR``. User mistakes end with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import io
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tyro.conf import Positional

from fastafd.errors import RunStopped, UserError

PROG = "fastafd"


# -- option names ---------------------------------------------------------------------------------


def option_names(cls: type, prefix: str = "") -> set[str]:
    """All ``--`` option names tyro generates for dataclass ``cls`` (underscore spelling)."""
    names: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            names |= option_names(typ, name + ".")
            continue
        names.add(name)
        if typ is bool:
            names.add(prefix + "no_" + f.name)
    return names


def check_options(args: Sequence[str], valid: set[str], command: str) -> None:
    """Raise a one-line :class:`UserError` for the first option that is not a config field."""
    for arg in args:
        if not arg.startswith("--") or arg in ("--help",):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if key in valid:
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.5)
        group = key.split(".", 1)[0] + "."
        siblings = sorted(v.split(".", 1)[1] for v in valid if v.startswith(group) and not v.split(".", 1)[1].startswith("no_"))
        hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else ""
        if siblings:
            hint += f" valid options of --{group[:-1]}: {', '.join(siblings)}."
        raise UserError(f"unknown option --{key}. {hint} See `{PROG} {command} --help`.")


def _one_line(text: str) -> str:
    """First section of a tyro error box, as one line."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip().strip("│╭╮╰╯─").strip()
        if raw.strip().startswith("│ ─") or raw.strip().startswith("╰"):
            break
        if line and not raw.strip().startswith("╭"):
            lines.append(line)
    return " ".join(lines) or text.strip()


def tyro_parse(cls: type, args: Sequence[str], *, default: object | None = None, prog: str, description: str) -> object:
    """Parse ``args`` into ``cls`` with tyro; its error boxes become one-line :class:`UserError` s."""
    import tyro

    if any(a in ("-h", "--help") for a in args):
        return tyro.cli(cls, args=list(args), default=default, prog=prog, description=description, use_underscores=True)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            return tyro.cli(cls, args=list(args), default=default, prog=prog, description=description, use_underscores=True)
    except SystemExit as e:
        if e.code:
            raise UserError(f"{_one_line(err.getvalue())} (see `{prog} --help`)") from None
        raise


# -- commands -------------------------------------------------------------------------------------


TRAIN_HELP = (
    "Train peers with one of the methods (independent, dml, l1, l2, afd). "
    "--recipe NAME picks the defaults (`fastafd recipes` lists them; default: demo); "
    "--data DIR is short for --data.root DIR; --profile START END is short for --log.profile START END; "
    "every other option below overrides one config field."
)


def cmd_train(argv: Sequence[str]) -> int:
    from fastafd import recipes
    from fastafd.config import TrainConfig

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--recipe", default="demo")
    pre.add_argument("--data", default=None)
    pre.add_argument("--profile", nargs=2, default=None, metavar=("START", "END"))
    try:
        known, rest = pre.parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        raise UserError(f"{e} (see `{PROG} train --help`)") from None
    base = recipes.get(known.recipe)
    if known.data is not None:
        rest = ["--data.root", known.data, *rest]
    if known.profile is not None:
        rest = ["--log.profile", *known.profile, *rest]
    check_options(rest, option_names(TrainConfig), "train")
    cfg = tyro_parse(TrainConfig, rest, default=base, prog=f"{PROG} train", description=TRAIN_HELP)
    cfg.recipe = known.recipe

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


def cmd_eval(argv: Sequence[str]) -> int:
    from fastafd.evaluate import evaluate_run

    args = tyro_parse(EvalArgs, argv, prog=f"{PROG} eval", description=EvalArgs.__doc__ or "")
    print(json.dumps(evaluate_run(args.run, data=args.data, batch_size=args.batch_size), indent=2))
    return 0


def cmd_recipes(argv: Sequence[str]) -> int:
    from fastafd import recipes

    if argv:
        raise UserError(f"`{PROG} recipes` takes no arguments (got {' '.join(argv)})")
    width = max(map(len, recipes.RECIPES))
    for name in recipes.RECIPES:
        print(f"{name:<{width}}  {recipes.describe(name)}")
    return 0


@dataclass
class PlotArgs:
    """Write PNG training curves of one or more runs (several runs are overlaid, labelled by folder and method)."""

    runs: Positional[tuple[Path, ...]]
    """Run directories written by `fastafd train`."""

    out: Path | None = None
    """Folder for the PNGs; default: <first run>/plots."""


def cmd_plot(argv: Sequence[str]) -> int:
    from fastafd.plot import plot_runs

    args = tyro_parse(PlotArgs, argv, prog=f"{PROG} plot", description=PlotArgs.__doc__ or "")
    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0


@dataclass
class ExportArgs:
    """Export one trained peer as a plain timm state dict (safetensors) from a run's newest valid checkpoint."""

    run: Positional[Path]
    """Run directory written by `fastafd train`."""

    peer: int = 0
    """Index of the peer to export (0-based, in --model.peers order)."""

    out: Path = Path("peer.safetensors")
    """Output file (.safetensors)."""


def cmd_export(argv: Sequence[str]) -> int:
    from fastafd.export import export_peer

    args = tyro_parse(ExportArgs, argv, prog=f"{PROG} export", description=ExportArgs.__doc__ or "")
    print(json.dumps(export_peer(args.run, args.peer, args.out), indent=2))
    return 0


def cmd_data(argv: Sequence[str]) -> int:
    from fastafd.data.commands import cmd_data as run

    return run(argv)


def cmd_bench(argv: Sequence[str]) -> int:
    from fastafd.bench import cmd_bench as run

    return run(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (cmd_train, "train peers (default: the demo recipe on built-in data)"),
    "eval": (cmd_eval, "evaluate a run directory"),
    "recipes": (cmd_recipes, "list the named recipes"),
    "data": (cmd_data, "pack a folder into webdataset shards; verify a dataset"),
    "plot": (cmd_plot, "write PNG training curves of one or more runs"),
    "export": (cmd_export, "export one trained peer as a timm state dict"),
    "bench": (cmd_bench, "throughput benchmarks (fastafd bench step)"),
}


def usage() -> str:
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


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
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
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

