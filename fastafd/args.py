"""Command-line parsing shared by every ``fastafd`` command: options generated from dataclasses by tyro,
unknown options and tyro's error boxes turned into one-line :class:`UserError` s.

Below :mod:`fastafd.cli` and the commands that parse their own options (``bench``, ``data``), so none
of them imports another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import typing
from collections.abc import Sequence

from fastafd.errors import UserError

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
