"""Fault injection for the crash tests; inert unless ``FASTAFD_FAULT`` is set.

``FASTAFD_FAULT=kill@step=7``: SIGKILL this process right after optimizer step 7 (global, 1-based).
``FASTAFD_FAULT=stop@step=3``: SIGSTOP it there instead (a hung rank: alive, silent, never exits).
``FASTAFD_FAULT=kill@checkpoint=2``: SIGKILL in the middle of the 2nd checkpoint write of this process
(after its first file is written, before the manifest). Only rank 0 writes checkpoints.
``FASTAFD_FAULT=sleep@data=1,sleep@checkpoint=1``: sleep ``FASTAFD_FAULT_SLEEP_S`` seconds (default 5) at
the 1st data scan of a node's first process and in the 1st checkpoint write (slow, healthy work).
Several faults are separated by commas.
"""

from __future__ import annotations

import os
import signal
import time

_counts: dict[str, int] = {}
_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def point(name: str, value: int | None = None) -> None:
    spec = os.environ.get("FASTAFD_FAULT")
    if not spec:
        return
    counted = False
    for one in spec.split(","):
        action, _, target = one.strip().partition("@")
        where, _, n = target.partition("=")
        if where != name or (action not in _SIGNALS and action != "sleep"):
            continue
        if not counted:
            _counts[name] = _counts.get(name, 0) + 1
            counted = True
        if (value if value is not None else _counts[name]) != int(n):
            continue
        if action == "sleep":
            time.sleep(float(os.environ.get("FASTAFD_FAULT_SLEEP_S", "5")))
        else:
            os.kill(os.getpid(), _SIGNALS[action])
