"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

ERROR_DIR = "FASTAFD_ERROR_DIR"
"""Set by ``fastafd.launch`` for its training processes: the folder where each rank records its one error line."""


class UserError(Exception):
    """A mistake in the user's input (config, data, model name).

    The CLI prints ``fastafd: error: <message>`` on one line and exits with code 2,
    without a traceback. The message must name the problem and the fix.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always a single line


def unknown_name(kind: str, name: str, known: Iterable[str], choices: str) -> UserError:
    """``unknown <kind> '<name>': did you mean <close matches>? <choices>``: a registry's one-line error for a name
    it does not have (``choices``: the sentence that lists what to choose from)."""
    close = difflib.get_close_matches(name, list(known), n=2)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(f"unknown {kind} '{name}': {hint}{choices}")


class RunStopped(Exception):
    """A run that cannot go on (e.g. non-finite losses for too many steps): one line, exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class Stopped(Exception):
    """A run stopped on request (SIGTERM) after writing its checkpoint: one line (not an error), exit 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


def record_error(line: str, exit_code: int, *, printed: bool) -> bool:
    """In a training process under ``fastafd.launch``: store this rank's error line (and whether it printed it);
    True if stored. The launcher then prints at most one line for the whole run (:func:`fastafd.launch.report`)."""
    folder, rank = os.environ.get(ERROR_DIR), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return False
    try:
        tmp = Path(folder) / f".rank-{rank}.json"
        tmp.write_text(json.dumps({"rank": int(rank), "exit_code": exit_code, "line": line, "printed": printed}))
        os.replace(tmp, Path(folder) / f"rank-{rank}.json")
    except (OSError, ValueError):
        return False
    return True


def require(module: str, extra: str, purpose: str, alternative: str = "", package: str = "") -> ModuleType:
    """Import an optional dependency, or raise a one-line :class:`UserError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = f", or {alternative}" if alternative else ""
        raise UserError(f"{purpose} needs the optional package {package or module}: pip install 'fastafd[{extra}]'{hint}") from None
