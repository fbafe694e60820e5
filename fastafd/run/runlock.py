"""One run per folder: an exclusive lock on the run folder for the life of the run.

Two ``fastafd train --out R`` at once would append to one ``metrics.jsonl``, interleave their
checkpoints and delete each other's temporaries. The main process therefore takes an exclusive
``flock`` on ``R/run.lock`` before it reads the folder's checkpoints or writes anything into it,
and holds it until the run ends, whatever the exit. A second run on the folder is refused with one
line naming the holder (host, pid, start time: written into the lock file by the holder).

``flock`` belongs to the open file, so the kernel releases it when the holder dies, even by SIGKILL:
a lock file left by a killed run is simply taken over by the next one, no stale-lock cleanup needed.
The holder unlinks the file before it releases the lock; a process that locked a file which was
unlinked meanwhile notices (the path no longer names the file it holds) and tries again, so two
processes can never both believe they hold the lock. Linux NFS clients map ``flock`` to NFS locks;
on a file system without locks (some FUSE mounts) the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from fastafd.errors import UserError
from fastafd.run import atomic

LOCK_FILE = "run.lock"


class RunLock:
    """The lock of one run folder (``acquire`` creates the folder; ``release`` removes what acquire created, if empty)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> None:
        """Take the lock, or raise a one-line :class:`UserError` naming the holder or the unwritable folder."""
        self._make_folder()
        try:
            while True:
                fd = self._open()
                try:
                    _flock_retrying(fd)
                except BlockingIOError:
                    os.close(fd)
                    raise UserError(
                        f"{self.run_dir} is in use by another fastafd run ({self._holder()}): wait for it to end (or stop it), "
                        "or pass another --out"
                    ) from None
                except OSError as e:  # no locks on this file system
                    warnings.warn(f"cannot lock {self.path} ({e.strerror}): a second run on this folder would not be detected", stacklevel=2)
                    self._fd = fd
                    break
                if self._same_file(fd):
                    self._fd = fd
                    break
                os.close(fd)  # the previous holder unlinked it between our open and our lock: take the new one
            self._record()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unlink the lock file (while still holding it), release it, and remove the folders acquire created if empty."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if self._same_file(self._fd):
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when nothing was written into it
        self._created = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _make_folder(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir} is a file, not a folder: pass a folder for the run (new or one to resume)")
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            for path in reversed(missing):
                try:
                    path.mkdir()
                except FileExistsError:
                    if path.is_dir():  # another run made it meanwhile (two runs started together): the lock decides
                        continue
                    raise
                self._created.append(path)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in (self.run_dir, *self.run_dir.parents) if p.exists() and not p.is_dir()), path)
            raise UserError(f"cannot create the run folder {self.run_dir}: {blocker} is a file; pass another --out") from None
        except OSError as e:
            raise UserError(f"cannot create the run folder {self.run_dir} ({_why(e)}): pass a writable --out") from None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"cannot write into the run folder {self.run_dir} ({_why(e)}): pass a writable --out") from None

    def _same_file(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _record(self) -> None:
        """Write who holds the lock into the lock file (what a refused run prints)."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": dt.datetime.now().isoformat(timespec="seconds"),
                "argv": sys.argv}
        data = (json.dumps(info) + "\n").encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as e:
            raise UserError(f"cannot write into the run folder {self.run_dir} ({_why(e)}): pass a writable --out") from None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder not recorded yet"


PROBE_RETRY_S = 0.25
"""How long :meth:`RunLock.acquire` keeps trying a lock that is taken before it refuses the run: :func:`holder`
takes a shared lock for the microseconds of its probe, and a run starting in that instant must not be refused."""


def _flock_retrying(fd: int) -> None:
    """``flock(LOCK_EX | LOCK_NB)``, tried again for :data:`PROBE_RETRY_S` while it is taken; BlockingIOError after."""
    deadline = time.monotonic() + PROBE_RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def holder(run_dir: Path) -> str | None:
    """Who holds the lock of ``run_dir`` (``host H, pid P, started T``), or None when no run holds it.

    A probe, for ``fastafd sweep status`` and the sweep executors: a shared, non-blocking ``flock`` on the
    lock file, released at once. It sees a holder on another node too (on NFS the lock is the server's),
    which reading ``/proc/locks`` would not; a run that starts during the probe retries
    (:data:`PROBE_RETRY_S`) instead of being refused. Nothing is created: no lock file, no folder.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return RunLock(run_dir)._holder()
    except OSError:  # no locks on this file system: nothing to learn
        return None
    finally:
        os.close(fd)  # closing drops our shared lock, if we got it
    return None


def _why(e: OSError) -> str:
    return atomic.describe(e.errno, e.strerror or str(e))


@contextlib.contextmanager
def hold(run_dir: Path, *, rank: int, world_size: int) -> Iterator[RunLock | None]:
    """Rank 0 holds the lock of ``run_dir`` for the ``with`` block; with several processes every rank
    learns whether it got it, so that all of them stop with the same line when it did not."""
    lock, error = None, None
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    if world_size > 1:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            box = [error]
            tdist.broadcast_object_list(box, src=0)
            error = box[0]
    if error is not None:
        raise UserError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
