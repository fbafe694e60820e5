"""``python -m fastafd.launch``: ``accelerate launch`` with fastafd's error reporting (what launch/run.sh runs).

It takes exactly ``accelerate launch``'s arguments and runs it in this process. What it changes is how
a failed run ends. Plain ``accelerate launch`` prints the user's one-line error once per rank, then
torchrun's ``ChildFailedError`` traceback and its agent's log lines, and exits 1 whatever the cause
(88 lines for a batch size that the process count does not divide). Here:

* the training processes get ``FASTAFD_ERROR_DIR``; a rank other than 0 writes its one-line error
  there instead of to stderr (rank 0 prints its own, see :func:`fastafd.cli.main`);
* when the run fails, the launcher prints nothing more if rank 0 has already said why, else the
  first failed rank's line, or, for a crash without one (a traceback above, a signal), one line
  naming the rank, its pid, host and exit code;
* after a rank failed, the others get SIGCONT (a SIGSTOPped rank can then act on it) and SIGTERM, and
  ``FASTAFD_STOP_GRACE_S`` seconds (1 to 3600, default 30) to exit before SIGKILL;
* Ctrl-C prints ``fastafd: interrupted`` once, from the launcher (the ranks say nothing), exit 130;
  c10d's C++ warnings are filtered (``TORCH_CPP_LOG_LEVEL=ERROR`` unless set); an error folder left
  by a killed launcher is removed by a later launch;
* it exits with the code the failed rank exited with: 2 for a user error, 1 for a stopped run, as
  a single process would; 143 for a run stopped by SIGTERM (see :mod:`fastafd.preempt`).

On several nodes each node's launcher reports its own ranks: at most one line per node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fastafd.errors import ERROR_DIR, UserError, record_error

__all__ = ["ERROR_DIR", "GRACE_ENV", "grace_s", "main", "record_error", "report"]

GRACE_ENV = "FASTAFD_STOP_GRACE_S"
"""Seconds the launcher waits, after a rank failed, for the others to exit on SIGTERM before it kills them
(torchrun's fixed 30 s otherwise); 1 to 3600, default 30 (a checkpoint write fits in it)."""
GRACE_RANGE = (1.0, 3600.0)
STALE_S = 24 * 3600
"""An error folder of a launcher that is gone (killed: no ``finally`` ran) is removed by the next launch after this long."""


def grace_s() -> float:
    """:data:`GRACE_ENV` checked: a number in :data:`GRACE_RANGE`, else one line."""
    raw = os.environ.get(GRACE_ENV, "30")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    lo, hi = GRACE_RANGE
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UserError(f"{GRACE_ENV}={raw!r} must be a number of seconds in [{lo:g}, {hi:g}], e.g. 30")
    return value


def clean_stale(tmp: Path | None = None) -> None:
    """Remove the error folders of launchers that were killed (SIGKILL, the OOM killer: no ``finally`` ran), once stale."""
    root = Path(tmp or tempfile.gettempdir())
    now = time.time()
    for folder in root.glob("fastafd-errors-*"):
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > STALE_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def _recorded(folder: Path) -> dict[int, dict]:
    out = {}
    for f in folder.glob("rank-*.json"):
        try:
            rec = json.loads(f.read_text())
            out[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError):
            continue
    return out


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""


def report(failures: dict, folder: Path) -> int:
    """One line (at most) for a failed run, and the exit code to leave with."""
    recorded = _recorded(folder)
    if recorded:
        first = recorded[min(recorded)]  # rank 0's when it has one (it printed it already)
        if not first["printed"]:
            print(first["line"], file=sys.stderr)
        return int(first["exit_code"])
    rank = min(failures)
    failure = failures[rank]
    code = int(getattr(failure, "exitcode", 1) or 1)
    print(f"fastafd: error: rank {rank} (pid {getattr(failure, 'pid', '?')} on {getattr(failure, 'hostname', '?')}) exited with code "
          f"{code}{_signal_name(code)}: see its output above", file=sys.stderr)
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        grace = grace_s()
    except UserError as e:
        print(f"fastafd: error: {e}", file=sys.stderr)
        return 2
    clean_stale()
    folder = Path(tempfile.mkdtemp(prefix="fastafd-errors-"))
    os.environ[ERROR_DIR] = str(folder)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's TCPStore warnings, ~150 lines when the store's host is gone
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the agent's per-failure log lines
    _set_grace(grace)
    try:
        launch_command(args)
        return 0
    except ChildFailedError as e:
        return report(e.failures, folder)
    except (KeyboardInterrupt, SignalException) as e:
        if isinstance(e, SignalException) and e.sigval != signal.SIGINT:
            raise
        print("fastafd: interrupted", file=sys.stderr)  # once for the run: the ranks say nothing under this launcher
        return 130
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_grace = [30.0]


def _set_grace(grace: float) -> None:
    """torchrun's agent: wake a stopped rank (SIGSTOP) so that it can act on the SIGTERM, and wait ``grace`` s, not 30."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    _grace[0] = grace
    real = LocalElasticAgent._shutdown
    if getattr(real, "fastafd", False):
        return

    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
        pcontext = getattr(self, "_pcontext", None)
        pids = pcontext.pids().values() if pcontext is not None and hasattr(pcontext, "pids") else ()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        return real(self, death_sig, max(1, round(_grace[0])))

    _shutdown.fastafd = True  # type: ignore[attr-defined]
    LocalElasticAgent._shutdown = _shutdown  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
