"""Atomic file writes whose temporary names never collide.

Every file of a run folder is written to a temporary sibling, fsynced and renamed into place, so a
reader sees the old file or the new one, never half of one. The temporary name holds the writer's
pid and a random suffix: two writers of the same file (two processes that both think they own a
run folder, two threads) never share a temporary, so neither can rename or delete the other's. A
temporary left by a killed writer is recognised by its pid (:func:`writer_alive`) and cleaned by
the next writer; one of a live process is left alone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

_PID = re.compile(r"\.tmp-(?:.*-)?(\d+)-[0-9a-f]{8}$")


def temp_name(name: str) -> str:
    """``<name>.tmp-<pid>-<8 hex>``: unique per process and call."""
    return f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def temp_dir_name(name: str) -> str:
    """``.tmp-<name>-<pid>-<8 hex>``: a hidden temporary folder for ``name``, unique per process and call."""
    return f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"


def writer_pid(name: str) -> int | None:
    """The pid in a name made by :func:`temp_name` or :func:`temp_dir_name` (or an older ``.tmp-<name>-<pid>``), else None."""
    m = _PID.search(name)
    if m:
        return int(m.group(1))
    tail = name.rsplit("-", 1)[-1]  # older checkpoint temporaries: .tmp-step-N-<pid>
    return int(tail) if name.startswith(".tmp-") and tail.isdigit() else None


def writer_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 probes without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename into the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a unique temporary sibling, fsync it, rename it to ``path``; no temporary survives a failure."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`replace`)."""
    replace(path, lambda tmp: tmp.write_text(text))


_OS_ERROR = re.compile(r"os error (\d+)")


def io_errno(e: BaseException) -> int | None:
    """The errno behind an I/O failure: an OSError's, or the one in safetensors' message (it writes from Rust)."""
    if isinstance(e, OSError):
        return e.errno
    m = _OS_ERROR.search(str(e))
    return int(m.group(1)) if m else None


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error(code: int) -> str:
    """``[Errno 13] Permission denied`` style: the OS error itself, for a message that must name it."""
    return f"{errno.errorcode.get(code, 'errno ' + str(code))}: {os.strerror(code)}"


def describe(code: int | None, fallback: str = "I/O error") -> str:
    """Few words for an errno, as the one-line errors use them."""
    if code in DISK_FULL:
        return "disk full" if code == errno.ENOSPC else "disk quota exceeded"
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return os.strerror(code) if code else fallback


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, the outputs' ledger)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
