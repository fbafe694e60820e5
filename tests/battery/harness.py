"""The hostile-input battery's harness: a table of cases, each a world built in a temporary folder and
the command a user would type in it; the expectation is one line on stderr that names the problem,
a given exit code, no traceback, and nothing written where the case says nothing may change.

A case is a :class:`Case` row; ``run_case`` runs it through ``fastafd.cli.main`` in this process
(fast: no interpreter start per case; the ``fastafd_cli`` fixture of tests/conftest.py runs the real
command, for signals and launchers). Add a row to grow the battery.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastafd import cli


@dataclass(frozen=True)
class Case:
    """One hostile input: ``build(tmp)`` makes the world and returns the CLI arguments."""

    id: str
    build: Callable[[Path], list[str]]
    needle: str
    """A substring of the one-line error (the problem or the fix)."""
    code: int = 2
    frozen: Callable[[Path], list[Path]] = field(default=lambda tmp: [tmp])
    """Paths (files or trees) that must be byte-identical before and after (default: all of tmp)."""
    created: Callable[[Path], list[Path]] = field(default=lambda tmp: [])
    """Paths that must not exist after the command."""

    def __str__(self) -> str:  # pytest ids
        return self.id


def tree_digest(paths: list[Path]) -> dict[str, str]:
    """Relative path -> SHA-256 (files), 'dir' (folders), 'link' (symlinks) for every path under ``paths``."""
    out: dict[str, str] = {}
    for root in paths:
        if root.is_symlink():
            out[str(root)] = "link"
            continue
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for d in dirnames:
                out[os.path.join(dirpath, d)] = "dir"
            for f in filenames:
                p = Path(dirpath, f)
                try:
                    out[str(p)] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
                except OSError:  # unreadable on purpose (a case's permission error)
                    out[str(p)] = "unreadable"
    return out


def assert_one_line(code: int, err: str, case: Case) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, f"{case.id}: traceback:\n{err[-3000:]}"
    assert len(lines) == 1, f"{case.id}: {len(lines)} lines on stderr:\n{err[-3000:]}"
    assert lines[0].startswith("fastafd: error: "), lines[0]
    assert case.needle in lines[0], f"{case.id}: {case.needle!r} not in {lines[0]!r}"
    return lines[0]


def run_case(case: Case, tmp_path: Path, capsys) -> str:
    """Run ``case`` in this process; returns the error line."""
    args = case.build(tmp_path)
    capsys.readouterr()
    before = tree_digest(case.frozen(tmp_path))
    code = cli.main(args)
    _, err = capsys.readouterr()
    line = assert_one_line(code, err, case)
    assert tree_digest(case.frozen(tmp_path)) == before, f"{case.id}: something was written or changed"
    for path in case.created(tmp_path):
        assert not path.exists(), f"{case.id}: {path} was created"
    return line
