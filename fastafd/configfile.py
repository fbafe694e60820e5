"""Config files: ``fastafd train --config FILE`` (YAML or JSON) and ``--print-config`` (YAML).

A file holds any subset of the config fields, nested as in ``config.json`` (``optim: {lr: 0.2}``);
a run folder's ``config.json`` is such a file. Values are checked against the dataclass field types
of :mod:`fastafd.config`; a bad file is a one-line :class:`UserError` naming the key and its line.
Below :mod:`fastafd.args`; imports only :mod:`fastafd.config` and :mod:`fastafd.errors`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from fastafd import choices
from fastafd.config import TrainConfig, to_dict
from fastafd.errors import UserError

Lines = dict[str, int]
"""1-based line of each dotted key in the file (``optim.lr``); absent where unknown."""


def load(path: Path) -> tuple[dict, Lines]:
    """The mapping in ``path`` and the line of each key; a missing or unreadable file, a syntax error or a
    top level that is not a mapping is a one-line :class:`UserError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file (write one with `fastafd train --print-config > {path.name}`)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path} line {e.lineno}: not valid JSON ({e.msg})") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"--config {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: the file must hold a mapping of config fields (like a run's config.json), not a {type(data).__name__}")
    return data, _lines(text)


def _lines(text: str) -> Lines:
    """Key lines from YAML's node tree (JSON parses as YAML too); empty where the text does not compose."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: Lines = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            name = prefix + str(key.value)
            lines.setdefault(name, key.start_mark.line + 1)
            walk(value, name + ".")

    walk(root, "")
    return lines


def apply(base: TrainConfig, data: dict, lines: Lines, path: Path) -> TrainConfig:
    """``base`` with the fields ``data`` sets; unknown keys and values of the wrong type are refused in one line."""
    try:
        return _build(TrainConfig, base, data, "", lines, Path(path))
    except UserError as e:
        if str(e).startswith("--config"):
            raise
        raise UserError(f"--config {path}: {e}") from None


def _where(path: Path, lines: Lines, key: str) -> str:
    line = lines.get(key)
    return f"--config {path}{f' line {line}' if line else ''}"


def _build(cls: type, base: object, data: dict, prefix: str, lines: Lines, path: Path) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            name = prefix + str(key)
            nested = [f"{n}.{key}" for n, t in hints.items() if dataclasses.is_dataclass(t) and str(key) in {f.name for f in dataclasses.fields(t)}]
            close = nested[:1] or [prefix + c for c in difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)]
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"{_where(path, lines, name)}: unknown key {name}: {hint}the keys of {prefix[:-1] or 'the top level'} are "
                            f"{', '.join(fields)}")
    kwargs = {}
    for name in fields:
        typ, old, key = hints[name], getattr(base, name), prefix + name
        if name not in data:
            kwargs[name] = copy.deepcopy(old)
        elif dataclasses.is_dataclass(typ):
            if not isinstance(data[name], dict):
                raise UserError(f"{_where(path, lines, key)}: {key} must be a mapping of its fields, not {data[name]!r}")
            kwargs[name] = _build(typ, old, data[name], key + ".", lines, path)
        else:
            try:
                kwargs[name] = _coerce(data[name], typ)
            except _Mismatch as e:
                raise UserError(f"{_where(path, lines, key)}: {key} must be {e}, not {data[name]!r}") from None
    return cls(**kwargs)


class _Mismatch(Exception):
    """A value that does not fit a field's type (the message says what would)."""


def _describe(typ: Any) -> str:
    if (names := choices.of(typ)) is not None:
        return "one of " + ", ".join(names)
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}s"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(typ, str(typ))


def _coerce(value: Any, typ: Any) -> Any:
    """``value`` (as YAML or JSON loads it) as a value of ``typ``, or :class:`_Mismatch`."""
    if (names := choices.of(typ)) is not None:  # a field that names a registry entry (a method, a data format)
        if isinstance(value, str) and value in names:
            return typ(value)
        raise _Mismatch("one of " + ", ".join(names))
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch(_describe(typ))
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1 reads a bare on/off as true/false
            value = "on" if value else "off"
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch(_describe(typ))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch(_describe(typ))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch(_describe(typ))
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is Path:
        if isinstance(value, str) and value:
            return Path(value)
    raise _Mismatch(_describe(typ))


def dump_yaml(cfg: TrainConfig) -> str:
    """The config as YAML, in field order: what ``--print-config`` prints and ``--config`` reads back."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_multi_representer(str, lambda d, v: d.represent_str(str(v)))  # MethodName & co.: plain strings
    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))  # lists on one line
    header = "# fastafd train config: run it with `fastafd train --config FILE` (options on the command line override it)\n"
    return header + yaml.dump(to_dict(cfg), Dumper=Dumper, sort_keys=False, default_flow_style=False, width=1000)
