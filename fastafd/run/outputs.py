"""The one writer of the files a command writes where the user says (``--out`` of report, plot, export, bench).

Rules, the same for every command:

- ``--out`` with the command's file suffix (``report.md``, ``peer.safetensors``) is that file, its
  siblings (``report.csv``, ``report.json``, ``report.png``) beside it; any other ``--out`` is a folder.
  An empty ``--out`` is refused (it would mean the current folder).
- A file is written atomically (:mod:`fastafd.run.atomic`: unique temporary, fsync, rename) and never over
  a file the command did not write: every folder it writes into keeps a ledger (:data:`LEDGER`, the
  name and sha256 of each file written there); an existing file that is not in it, or was changed
  since, is refused in one line, before anything is written. So is a folder ``--out`` that exists,
  holds files and no ledger (a folder the command did not make), and a path under a file.
- An OS error (read-only folder, no permission, disk full) is one line naming the path and the error.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fastafd.errors import UserError
from fastafd.run import atomic

LEDGER = ".fastafd-outputs.json"
"""In every folder a command writes its outputs into: ``{file name: sha256}`` of what it wrote."""


def _ledger(folder: Path) -> dict[str, str]:
    try:
        value = json.loads((folder / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(value, dict) else {}


def check_empty(out: Path | str | None, option: str = "--out") -> None:
    if out is not None and not str(out).strip():
        raise UserError(f"{option} is empty: give a folder or a file name, e.g. {option} results")


def refuse_empty(argv: Sequence[str], options: Sequence[str] = ("--out",)) -> None:
    """Refuse ``--out ""`` (or ``--out=``) in the raw arguments: the parser turns it into ``Path(".")``, the current
    folder, where a command would write among the user's files."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        for option in options:
            value = argv[i + 1] if arg == option and i + 1 < len(argv) else arg[len(option) + 1 :] if arg.startswith(option + "=") else None
            if value is not None and not value.strip():
                check_empty(value, option)


def resolve(out: Path | None, default: Path, suffix: str, stem: str, option: str = "--out") -> tuple[Path, str]:
    """(folder, file stem) for ``out``: a name ending in ``suffix`` is the main file (stem from it), anything else a folder
    (``stem`` kept); None: ``default`` (a folder)."""
    check_empty(out, option)
    if out is None:
        return Path(default), stem
    out = Path(out)
    if out.name.endswith(suffix) and len(out.name) > len(suffix):
        return out.parent, out.name[: -len(suffix)]
    return out, stem


def what_is(path: Path) -> str:
    """``a file``, ``a folder``, ... for the one-line errors."""
    return "a folder" if path.is_dir() else "a file" if path.is_file() else "not a regular file"


def _under_a_file(path: Path) -> Path | None:
    for p in path.parents:
        if p.exists():
            return p if not p.is_dir() else None
    return None


class Outputs:
    """The files one command writes, checked all together before the first is written (:meth:`check`)."""

    def __init__(self, paths: Iterable[Path], option: str = "--out", folder: Path | None = None,
                 recognise: Callable[[Path], bool] | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.option = option
        self.recognise = recognise
        """For files fastafd wrote before it kept a ledger (committed benchmark results): True when ``path`` is one."""
        self.folder = folder
        """The folder ``--out`` named (None: ``--out`` named a file): refused when it holds files and no ledger."""

    def check(self) -> None:
        """Refuse, in one line and before anything is written, a target the command did not write."""
        if self.folder is not None:
            f = self.folder
            if (blocker := _under_a_file(f / "x")) is not None:
                raise UserError(f"{self.option} {f}: {blocker} is a file, not a folder: pass a folder or a new path")
            if f.is_dir() and not (f / LEDGER).is_file() and any(f.iterdir()):
                raise UserError(f"{self.option} {f} is an existing folder that fastafd did not write (it holds other files): "
                                "pass a new or empty folder, so nothing of yours is overwritten")
        for p in self.paths:
            if (blocker := _under_a_file(p)) is not None:
                raise UserError(f"{self.option}: cannot write {p}: {blocker} is a file, not a folder: pass another {self.option}")
            if not p.exists() and not p.is_symlink():
                continue
            if p.is_symlink() or not p.is_file():
                raise UserError(f"{self.option}: {p} exists and is {what_is(p) if not p.is_symlink() else 'a link'}, "
                                f"not a file fastafd wrote: pass another {self.option}")
            recorded = _ledger(p.parent).get(p.name)
            if recorded is None and self.recognise is not None and self.recognise(p):
                continue
            if recorded is None:
                raise UserError(f"{self.option}: {p} exists and fastafd did not write it: pass another {self.option} "
                                "(or move the file away), so it is not overwritten")
            if recorded != atomic.sha256_file(p):
                raise UserError(f"{self.option}: {p} was changed since fastafd wrote it: pass another {self.option} "
                                "(or move the file away), so your changes are not overwritten")

    def write(self, path: Path, write: Callable[[Path], None]) -> Path:
        """``write(tmp)`` then rename to ``path`` (atomic), recorded in the folder's ledger; OSError: one line."""
        path = Path(path)
        if path not in self.paths:
            raise AssertionError(f"{path} was not checked")
        created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.replace(path, write)
            ledger = _ledger(path.parent)
            ledger[path.name] = atomic.sha256_file(path)
            atomic.write_text(path.parent / LEDGER, json.dumps(ledger, indent=1, sort_keys=True) + "\n")
        except Exception as e:  # safetensors writes from Rust: its errors carry the errno in the message
            code = atomic.io_errno(e)
            if code is None:
                raise
            for p in created:  # deepest first: only what this call made, and only if still empty
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise UserError(f"cannot write {path} ({atomic.describe(code)}): pass a writable {self.option}") from None
        return path

    def write_text(self, path: Path, text: str) -> Path:
        return self.write(path, lambda tmp: tmp.write_text(text))


def fix_mode(path: Path) -> None:
    """Give a written file the permissions of any other file the user writes (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
