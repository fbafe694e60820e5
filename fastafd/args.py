"""Command-line parsing shared by every ``fastafd`` command: options generated from dataclasses by tyro,
unknown options and tyro's error boxes turned into one-line :class:`UserError` s.

Below :mod:`fastafd.cli` and the commands that parse their own options (``bench``, ``data``), so none
of them imports another.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import io
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastafd.errors import UserError

if TYPE_CHECKING:
    from fastafd.config import TrainConfig

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


def option_values(args: Sequence[str], name: str) -> list[str]:
    """The values given to option ``--name`` in ``args`` (as ``--name V`` or ``--name=V``; dashes or underscores)."""
    values = []
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or key[2:].replace("-", "_") != name:
            continue
        if eq:
            values.append(value)
        elif i + 1 < len(args):
            values.append(args[i + 1])
    return values


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


def _registered_names() -> object:
    """tyro's rules for the config fields that name a registry entry (config declares them as ``str`` subclasses
    and does not import the registries): their choices come from the registry, read when such a field is parsed."""
    from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

    from fastafd import choices

    rules = ConstructorRegistry()

    @rules.primitive_rule
    def _registered(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
        kind = info.type
        names = choices.of(kind)
        if names is None:
            return None
        return PrimitiveConstructorSpec(
            nargs=1, metavar="{" + ",".join(names) + "}", instance_from_str=lambda a: kind(a[0]),
            is_instance=lambda x: isinstance(x, str), str_from_instance=lambda x: [str(x)], choices=names,
        )

    return rules


def tyro_parse(cls: type, args: Sequence[str], *, default: object | None = None, prog: str, description: str) -> object:
    """Parse ``args`` into ``cls`` with tyro; its error boxes become one-line :class:`UserError` s."""
    import tyro

    kw = dict(default=default, prog=prog, description=description, use_underscores=True, registry=_registered_names())
    if any(a in ("-h", "--help") for a in args):
        return tyro.cli(cls, args=list(args), **kw)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            return tyro.cli(cls, args=list(args), **kw)
    except SystemExit as e:
        if e.code:
            raise UserError(f"{_one_line(err.getvalue())} (see `{prog} --help`)") from None
        raise


# -- fastafd train's arguments --------------------------------------------------------------------


def train_help() -> str:
    from fastafd.methods import registry

    return (
        f"Train peers with one of the methods ({', '.join(registry.names())}; `{PROG} methods` describes them). "
        f"--recipe NAME picks the defaults (`{PROG} recipes` lists them; default: demo); "
        "--data DIR is short for --data.root DIR; --profile START END is short for --log.profile START END; "
        "every other option below overrides one config field."
    )


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    """The config ``fastafd train ARGV`` runs: ``--recipe NAME`` picks the defaults, ``--data DIR`` and
    ``--profile START END`` are short forms, every other option overrides one field. Also what
    ``fastafd sweep`` checks each cell with before it writes anything, so that a cell's command
    cannot fail on its options later. ``--config FILE`` sits between the recipe and the options:
    recipe defaults (``--recipe``, else the file's ``recipe``, else demo), then the file's fields, then
    the options. ``--print-config`` is accepted and ignored here (see :func:`wants_print_config`)."""
    from fastafd import configfile, methods, recipes
    from fastafd.config import TrainConfig

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--recipe", default=None)
    pre.add_argument("--config", default=None)
    pre.add_argument("--print-config", "--print_config", action="store_true")
    pre.add_argument("--data", default=None)
    pre.add_argument("--profile", nargs=2, default=None, metavar=("START", "END"))
    try:
        known, rest = pre.parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        raise UserError(f"{e} (see `{PROG} train --help`)") from None
    data: dict = {}
    if known.config is not None:
        data, lines = configfile.load(Path(known.config))
    recipe = known.recipe or data.get("recipe") or "demo"
    if not isinstance(recipe, str):
        raise UserError(f"--config {known.config}: recipe must be a recipe name (`{PROG} recipes`), not {recipe!r}")
    base = recipes.get(recipe)
    if known.config is not None:
        base = configfile.apply(base, data, lines, Path(known.config))
    if known.data is not None:
        if given := option_values(rest, "data.root"):
            raise UserError(f"--data {known.data} and --data.root {given[0]} both name the dataset folder: pass one of them")
        rest = ["--data.root", known.data, *rest]
    if known.profile is not None:
        if option_values(rest, "log.profile"):
            raise UserError("--profile and --log.profile both give the profiled steps: pass one of them")
        rest = ["--log.profile", *known.profile, *rest]
    if any(not v.strip() for v in option_values(rest, "out")):
        raise UserError("--out is empty (it would write the run into the current folder): give the run folder, e.g. --out runs/my-run, "
                        "or leave --out out for runs/<recipe>-<date>-<time>")
    check_options(rest, option_names(TrainConfig), "train")
    cfg = tyro_parse(TrainConfig, rest, default=base, prog=f"{PROG} train", description=train_help())
    cfg.recipe = recipe
    methods.validate(cfg)
    return cfg


def wants_print_config(argv: Sequence[str]) -> bool:
    """``--print-config`` among ``fastafd train``'s arguments."""
    return any(a in ("--print-config", "--print_config") for a in argv)
