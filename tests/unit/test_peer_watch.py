"""The dead-rank watchdog (fastafd.dist.PeerWatch) against a real TCPStore, two "ranks" in one process."""

import threading
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from fastafd import dist

PERIOD_S = 0.2


@pytest.fixture
def store(monkeypatch):
    master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=20))
    clients = []

    def client():  # one client per rank, as in a real run
        c = TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=20))
        clients.append(c)
        return c

    # the watch takes the rendezvous store of the process group: give each new watch its own client
    monkeypatch.setattr("torch.distributed.distributed_c10d._get_default_store", client)
    yield master


class Said:
    def __init__(self):
        self.lines, self.event = [], threading.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self.event.set()


def watch(rank: int, said: Said, **kw) -> dist.PeerWatch:
    return dist.PeerWatch(rank, 2, timeout_s=1.0, period_s=PERIOD_S, on_lost=said, **kw)


def test_a_rank_that_arrives_late_is_not_declared_dead(store):
    """The issue's reproduction: the second rank reaches the watch 2.5 s after the first (timeout 1 s).
    Its heartbeat thread runs a little slower (a busy rank's thread gets the GIL late), so the first
    rank's next read can see its count unchanged: that must not count from before it arrived."""
    said = Said()
    first = watch(0, said, start_timeout_s=30)
    time.sleep(2.5)
    second = dist.PeerWatch(1, 2, timeout_s=1.0, period_s=1.5 * PERIOD_S, on_lost=said, start_timeout_s=30)
    time.sleep(3.0)  # many periods of watching each other
    first.close()
    second.close()
    assert said.lines == []


def test_a_rank_that_never_starts_is_named_within_its_bound_and_reads_never_block(store):
    said = Said()
    start = time.monotonic()
    first = watch(0, said, start_timeout_s=1.5)
    try:
        assert said.event.wait(1.5 + 6 * PERIOD_S + 2), "no verdict: the watch is blocked waiting for the absent rank's key"
        took = time.monotonic() - start
        assert len(said.lines) == 1 and "rank 1 of 2 never started" in said.lines[0], said.lines
        assert took >= 1.5, took
        # the main thread's question after an error returns at once too (no blocking read of a missing key)
        t = time.monotonic()
        assert first.failed_ranks() == [1]
        assert time.monotonic() - t < 3 * PERIOD_S + 2
    finally:
        first.close()


def test_a_rank_that_stops_beating_after_both_met_is_named(store):
    said = Said()
    first, second = watch(0, said, start_timeout_s=30), watch(1, said, start_timeout_s=30)
    time.sleep(1.0)
    second._stop.set()  # its thread ends without marking it done: a hung or killed process
    try:
        assert said.event.wait(1.0 + 6 * PERIOD_S + 2)
        assert len(said.lines) == 1 and "rank 1 of 2 stopped" in said.lines[0], said.lines
    finally:
        first.close()
