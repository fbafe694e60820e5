"""Host clocks of the training loop: the data-wait fraction and the means over a log interval.

**Data-wait fraction.** :class:`LoopClock` adds up the host time spent inside ``next()`` of the
training loader (with ``perf_counter``) and divides it by the wall time between two log points.
Both ends of that interval are host syncs (``means()``), so the wall time is the real time the
device took for those steps even though CUDA runs asynchronously in between; ``next()`` returns as
soon as the loader has a batch ready (DALI prefetches on its own threads and stream), so time spent
there is time the training loop could not enqueue work because input was not ready. It is measured
on rank 0 only. It is a host-side measure: while the host is ahead of the GPU, a slow ``next()``
may still be hidden behind queued GPU work, so the fraction is an upper bound on the time the GPU
idled for data (0 % means the input pipeline is never the bottleneck).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping

from fastafd.observe.profile import trace_range


class LoopClock:
    """Host wall time and time blocked in the loader's ``next()`` since the last :meth:`lap`."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.t0 = time.perf_counter()
        self.wait = 0.0

    def batches(self, loader: Iterable) -> Iterator:
        """Iterate ``loader``, timing each ``next()`` (inside a ``data`` trace range)."""
        t = time.perf_counter()
        it = iter(loader)
        self.wait += time.perf_counter() - t
        while True:
            t = time.perf_counter()
            with trace_range("data"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            self.wait += time.perf_counter() - t
            yield batch

    def lap(self) -> tuple[float, float]:
        """(seconds, fraction of them spent waiting for data) since the last lap; starts a new one.

        Call it right after a host sync so that the interval ends where the device work ends.
        """
        now = time.perf_counter()
        seconds = max(now - self.t0, 1e-9)
        frac = min(self.wait / seconds, 1.0)
        self.t0, self.wait = now, 0.0
        return seconds, frac


class IntervalMeans:
    """Means over the last log interval from the epoch-to-date means ``RunningMeans`` returns (host only)."""

    def __init__(self) -> None:
        self.prev: dict[str, list[float]] = {}
        self.prev_steps = 0

    def update(self, means: Mapping[str, list[float]], steps: int) -> dict[str, list[float]]:
        n = steps - self.prev_steps
        out = {}
        for key, values in means.items():
            before = self.prev.get(key, [0.0] * len(values))
            out[key] = [(v * steps - b * self.prev_steps) / n for v, b in zip(values, before, strict=True)] if n > 0 else list(values)
        self.prev, self.prev_steps = {k: list(v) for k, v in means.items()}, steps
        return out
