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
* it exits with the code the failed rank exited with: 2 for a user error, 1 for a stopped run, as
  a single process would; 143 for a run stopped by SIGTERM (see :mod:`fastafd.preempt`).

On several nodes each node's launcher reports its own ranks: at most one line per node.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ERROR_DIR = "FASTAFD_ERROR_DIR"


def record_error(line: str, exit_code: int, *, printed: bool) -> bool:
    """In a training process under this launcher: store this rank's error line; True if stored."""
    folder, rank = os.environ.get(ERROR_DIR), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return False
    tmp = Path(folder) / f".rank-{rank}.json"
    tmp.write_text(json.dumps({"rank": int(rank), "exit_code": exit_code, "line": line, "printed": printed}))
    os.replace(tmp, Path(folder) / f"rank-{rank}.json")
    return True


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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    folder = Path(tempfile.mkdtemp(prefix="fastafd-errors-"))
    os.environ[ERROR_DIR] = str(folder)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the agent's per-failure log lines
    try:
        launch_command(args)
        return 0
    except ChildFailedError as e:
        return report(e.failures, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
