"""runlock.holder: the probe that `fastafd sweep status` uses to tell a running cell, and that it never refuses a run."""

import fcntl
import os
import threading
import time

import pytest

from fastafd.errors import UserError
from fastafd.run import runlock


def test_holder_names_the_holder_while_the_lock_is_held_and_none_after(tmp_path):
    run = tmp_path / "run"
    assert runlock.holder(run) is None and not run.exists()  # nothing created by the probe
    lock = runlock.RunLock(run)
    lock.acquire()
    try:
        found = runlock.holder(run)
        assert found is not None and f"pid {os.getpid()}" in found and "started" in found
    finally:
        lock.release()
    assert runlock.holder(run) is None


def test_holder_of_a_lock_file_left_by_a_dead_run_is_none(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_FILE).write_text('{"host": "h", "pid": 1, "started": "x"}\n')  # no flock: its holder died
    assert runlock.holder(run) is None


def _hold_shared(path, seconds, ready):
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    ready.set()
    time.sleep(seconds)
    os.close(fd)


def test_a_run_starting_during_a_probe_waits_for_it_instead_of_being_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_FILE).write_text("")
    ready = threading.Event()
    probe = threading.Thread(target=_hold_shared, args=(run / runlock.LOCK_FILE, runlock.PROBE_RETRY_S / 3, ready))
    probe.start()
    ready.wait()
    lock = runlock.RunLock(run)
    lock.acquire()  # the shared lock goes away within the retry window
    lock.release()
    probe.join()


def test_a_lock_held_longer_than_the_retry_window_is_still_refused(tmp_path):
    run = tmp_path / "run"
    holder = runlock.RunLock(run)
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match="in use by another fastafd run"):
            runlock.RunLock(run).acquire()
        assert time.monotonic() - started < runlock.PROBE_RETRY_S + 1.0
    finally:
        holder.release()


def test_a_folder_made_by_another_run_meanwhile_is_not_called_a_file(tmp_path, monkeypatch):
    """Two runs started together: both see --out missing, the other one's mkdir wins; this one must go on to
    the lock (which then names the holder), not report the new folder as a file."""
    from pathlib import Path

    run = tmp_path / "a" / "run"
    real_mkdir = Path.mkdir

    def raced(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)  # the other process
        raise FileExistsError(17, "File exists", str(self))

    monkeypatch.setattr(Path, "mkdir", raced)
    lock = runlock.RunLock(run)
    lock.acquire()
    monkeypatch.undo()
    try:
        assert run.is_dir() and (run / runlock.LOCK_FILE).exists()
    finally:
        lock.release()
    assert run.is_dir()  # not ours to remove: another run made it
