"""Fault injection for the crash tests; inert unless ``FASTAFD_FAULT`` is set.

``FASTAFD_FAULT=kill@step=7``: SIGKILL this process right after optimizer step 7 (global, 1-based).
``FASTAFD_FAULT=stop@step=3``: SIGSTOP it there instead (a hung rank: alive, silent, never exits).
``FASTAFD_FAULT=kill@checkpoint=2``: SIGKILL in the middle of the 2nd checkpoint write of this process
(after its first file is written, before the manifest). Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def point(name: str, value: int | None = None) -> None:
    spec = os.environ.get("FASTAFD_FAULT")
    if not spec:
        return
    action, _, target = spec.partition("@")
    where, _, n = target.partition("=")
    if action not in _SIGNALS or where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    hit = (value if value is not None else _counts[name]) == int(n)
    if hit:
        os.kill(os.getpid(), _SIGNALS[action])
