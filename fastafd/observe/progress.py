"""Progress of the long data commands (demo generation, ``data verify``, ``data pack``): a tqdm bar on a
terminal, and plain lines in logs (Slurm output files, ``| tee``), where a bar's carriage returns
would pile up as one endless line. The training loop has its own (:class:`fastafd.observe.console.Progress`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LINE_EVERY_S = 30.0
"""Seconds between two lines in a log."""


class Lines:
    """tqdm's ``update``/``close`` for a log: one line every :data:`LINE_EVERY_S` seconds and one at the end."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_EVERY_S:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.0f} {self.unit}/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n:
            self._line(time.monotonic())

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "img"):
    """A progress object with ``update(n)``, ``close()`` and ``with``: a bar on a terminal, lines otherwise."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5, leave=False)
    return Lines(total, desc, unit)


def iterate(items: Iterable[T], total: int, desc: str, *, enabled: bool = True, unit: str = "img") -> Iterator[T]:
    """``items`` with progress (see :func:`bar`)."""
    with bar(total, desc, enabled=enabled, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)
