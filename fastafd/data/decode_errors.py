"""Naming the file behind a DALI decode failure, in one line that says how to fix it.

DALI names the file for some failures (``File mapping failed: <path>`` for an empty file) but not
for a corrupt image (``nvImageCodec failure``); then the images around the failing batch are
decoded with PIL to find it. No DALI import here: only DALI's error text is read.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

from fastafd.data.base import DataError
from fastafd.data.formats import HEAD_BYTES, header_problem

_PATH_IN_ERROR = re.compile(r"(?:File mapping failed|[Ff]ile|[Pp]ath)[^:\n]*:\s*(/[^\s'\"]+)")
_OPERATOR_IN_ERROR = re.compile(r"Error in \w+ operator `([\w.]+)`")


def _cause(text: str) -> str:
    """DALI's multi-line report's cause: the first line after ``encountered:``."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"), lines[0] if lines else "")


def undecodable(data: bytes) -> str | None:
    """Why DALI's format rules refuse ``data``, or PIL cannot decode it to RGB; None when neither.

    The format rules come first: PIL decodes GIF, ICO, TGA, ... which DALI does not, so a GIF under
    a .JPEG name could not be named by PIL alone.
    """
    from PIL import Image

    why = header_problem(data[:HEAD_BYTES])
    if why:
        return why
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


def find_bad(candidates: list[tuple[str, Callable[[], bytes]]]) -> tuple[str, str] | None:
    for name, read in candidates:
        try:
            why = undecodable(read())
        except OSError as exc:
            why = f"cannot read: {exc.strerror}"
        if why:
            return name, why
    return None


def decode_error(exc: Exception, root: str, verify_root: str,
                 candidates: Callable[[], list[tuple[str, Callable[[], bytes]]]] | None = None) -> DataError:
    """A one-line :class:`DataError` for a DALI failure that names the failing file.

    DALI names the file for some failures (``File mapping failed: <path>`` for an empty file) but
    not for a corrupt image (``nvImageCodec failure``); then the images of the batches around the
    failing one (``candidates``) are decoded with PIL to find it.
    """
    text = str(exc)
    cause = _cause(text)
    op = _OPERATOR_IN_ERROR.search(text)
    where = f" in {op.group(1)}" if op else ""
    hint = f"run `fastafd data verify {verify_root}` and replace the file or list it in --data.exclude"
    path = _PATH_IN_ERROR.search(text.split("encountered:", 1)[-1])  # skip DALI's traceback of the pipeline
    if path:
        return DataError(f"cannot read {path.group(1)}{where} ({cause}): {hint}")
    found = find_bad(candidates()) if candidates is not None else None
    if found:
        return DataError(f"cannot decode {found[0]} ({found[1]}; DALI{where}: {cause}): {hint}")
    return DataError(f"DALI failed{where} on an image under {root} ({cause}); the file could not be identified: {hint}")
