"""The one reader of every file fastafd reads back: typed, bounded, one line naming file and line.

Run folders and sweep folders are files on disk that a disk, a killed writer or a person can damage:
a non-UTF-8 byte, a torn last line, ``"epoch": Infinity``, a list where an object belongs, a number
with ten thousand digits. Every reader of ``metrics.jsonl``, ``sweep.json``, ``status/<cell>.json``,
``config.json``, ``best.json`` and a checkpoint's ``manifest.json`` goes through here, so none of
those can end in a traceback: a damaged file is a :class:`Damaged` error (a :class:`UserError`: one
line, ``FILE:LINE: what is wrong``), and a damaged line of a JSON-lines file is skipped and named.
Nothing here writes.

JSON is read strictly: ``NaN``, ``Infinity`` and numbers beyond a float are refused (Python's
``json`` accepts them and hands back values that later fail far from the file), and so are files
over :data:`MAX_BYTES` and nesting deeper than the recursion limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastafd.errors import UserError

MAX_BYTES = 256 * 2**20
"""The largest file read back (metrics of a million epochs are far below it)."""
MAX_EPOCH = 10**7


class Damaged(UserError):
    """A file fastafd wrote and reads back is not what it wrote: ``FILE[:LINE]: what``, then the fix."""


def where(path: Path, line: int | None = None) -> str:
    return f"{path}:{line}" if line else str(path)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is beyond a float")
    return value


def loads(text: str, *, nonfinite: bool = False) -> Any:
    """Strict JSON: ValueError on NaN/Infinity (unless ``nonfinite``: metrics rows may hold a NaN loss; the fields
    a reader uses are checked by type), floats beyond range, over-long integers and too deep nesting."""
    try:
        if nonfinite:
            return json.loads(text)
        return json.loads(text, parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_text(path: Path, fix: str = "") -> str:
    """The file's text; a missing, unreadable, too large or non-UTF-8 file is a :class:`Damaged` error
    (non-UTF-8: naming the line of the first bad byte)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise Damaged(f"{path}: cannot read it ({e.strerror or e})" + (f": {fix}" if fix else "")) from None
    if len(data) > MAX_BYTES:
        raise Damaged(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a file fastafd wrote" + (f": {fix}" if fix else ""))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise Damaged(f"{where(path, line)}: byte {data[e.start]:#04x} is not UTF-8 text" + (f": {fix}" if fix else "")) from None


def read_json(path: Path, fix: str = "") -> dict:
    """A JSON object from ``path`` (strict, bounded); anything else is one :class:`Damaged` line."""
    path = Path(path)
    text = read_text(path, fix)
    try:
        value = loads(text)
    except ValueError as e:
        line = getattr(e, "lineno", None)
        msg = getattr(e, "msg", None) or str(e)
        raise Damaged(f"{where(path, line)}: not JSON ({msg})" + (f": {fix}" if fix else "")) from None
    if not isinstance(value, dict):
        raise Damaged(f"{path}: a JSON {type_name(value)}, not an object" + (f": {fix}" if fix else ""))
    return value


@dataclass
class Lines:
    """The rows of a JSON-lines file that passed ``check``, with their line numbers, and one line per damaged row."""

    rows: list[dict] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)


def read_jsonl(path: Path, check: Callable[[dict], None] | None = None, *, nonfinite: bool = False) -> Lines:
    """Every line of a JSON-lines file as an object; a line that is not one (or that ``check`` refuses
    with ValueError) is skipped and named (``FILE:LINE: why``). A non-UTF-8 byte damages its line only.
    A missing or unreadable file is a :class:`Damaged` error."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise Damaged(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise Damaged(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a file fastafd wrote")
    out = Lines()
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            value = loads(raw.decode("utf-8"), nonfinite=nonfinite)
            if not isinstance(value, dict):
                raise ValueError(f"a JSON {type_name(value)}, not an object")
            if check is not None:
                check(value)
        except UnicodeDecodeError as e:
            out.damaged.append(f"{where(path, n)}: byte {raw[e.start]:#04x} is not UTF-8 text")
        except (ValueError, TypeError, KeyError) as e:
            out.damaged.append(f"{where(path, n)}: {getattr(e, 'msg', None) or e}")
        else:
            out.rows.append(value)
            out.numbers.append(n)
    return out


# -- typed fields -----------------------------------------------------------------------------------


def type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "list", str: "string", int: "integer", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def integer(obj: Mapping, key: str, lo: int = 0, hi: int = MAX_EPOCH) -> int:
    """``obj[key]`` as an int in [lo, hi]; ValueError naming the field otherwise."""
    if key not in obj:
        raise ValueError(f"no {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{key!r} is {_show(v)}, not an integer in [{lo}, {hi}]")
    return v


def number(obj: Mapping, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``obj[key]`` as a finite float in [lo, hi]; ValueError naming the field otherwise."""
    if key not in obj:
        raise ValueError(f"no {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{key!r} is {_show(v)}, not a finite number in [{lo:g}, {hi:g}]")
    return float(v)


def string(obj: Mapping, key: str) -> str:
    if key not in obj:
        raise ValueError(f"no {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise ValueError(f"{key!r} is a {type_name(v)}, not a string")
    return v


def strings(obj: Mapping, key: str, *, default: list | None = None) -> list[str]:
    """``obj[key]`` as a list of strings (``default`` when absent, if given)."""
    if key not in obj and default is not None:
        return list(default)
    return _list_of(obj, key, str, "strings")


def objects(obj: Mapping, key: str) -> list[dict]:
    return _list_of(obj, key, dict, "objects")


def _list_of(obj: Mapping, key: str, kind: type, what: str) -> list:
    """``obj[key]`` as a list whose items are all ``kind``; ValueError naming the key otherwise."""
    if key not in obj:
        raise ValueError(f"no {key!r}")
    v = obj[key]
    if not isinstance(v, list) or not all(isinstance(x, kind) for x in v):
        raise ValueError(f"{key!r} is {_show(v)}, not a list of {what}")
    return list(v)


def _show(v: object) -> str:
    text = repr(v)
    return f"{type_name(v)} {text[:40]}{'...' if len(text) > 40 else ''}"


# -- the files ----------------------------------------------------------------------------------------


TOP1 = (0.0, 100.0)


def check_metrics_row(row: dict) -> None:
    """A ``metrics.jsonl`` row: an ``epoch`` in [1, MAX_EPOCH]; where present, top-1 values finite in [0, 100]."""
    integer(row, "epoch", 1, MAX_EPOCH)
    if "ensemble_top1" in row:
        number(row, "ensemble_top1", *TOP1)
    if "peers" in row:
        for i, p in enumerate(objects(row, "peers")):
            try:
                number(p, "top1", *TOP1)
            except ValueError as e:
                raise ValueError(f"peers[{i}]: {e}") from None


def metrics(path: Path) -> Lines:
    """The rows of a ``metrics.jsonl`` (each checked by :func:`check_metrics_row`); damaged lines named and skipped."""
    return read_jsonl(path, check_metrics_row, nonfinite=True)


def metrics_or_none(path: Path) -> Lines | None:
    """:func:`metrics`, or None where there is no file yet."""
    try:
        return metrics(path)
    except Damaged:
        if not Path(path).exists():
            return None
        raise
