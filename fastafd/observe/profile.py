"""Profiler traces and trace ranges.

**Trace ranges.** :func:`trace_range` names a region in profiler traces (``record_function``, only
while a profile is being recorded) and in Nsight Systems (NVTX, on CUDA). Otherwise it returns a
shared ``nullcontext``: a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

PROFILE_DIR = "profile"
"""Run subfolder with the profiler traces (``rank<R>.<time>.pt.trace.json.gz``)."""


class _RangeState:
    record = False  # a torch.profiler recording is active
    nvtx = False  # NVTX ranges on (CUDA runs)


_NULL = contextlib.nullcontext()


class _Range:
    __slots__ = ("name", "nvtx", "rf")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nvtx = False
        self.rf: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> None:
        if _RangeState.nvtx:
            torch.cuda.nvtx.range_push(self.name)
            self.nvtx = True
        if _RangeState.record:
            self.rf = torch.profiler.record_function(self.name)
            self.rf.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.rf is not None:
            self.rf.__exit__(*exc)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()


def trace_range(name: str) -> contextlib.AbstractContextManager:
    """A named range in profiler traces and Nsight Systems; a shared no-op unless one of them is on."""
    if _RangeState.record or _RangeState.nvtx:
        return _Range(name)
    return _NULL


def stage_range(method: Callable) -> Callable:
    """Decorator for ``Stage`` methods: run them inside a trace range named ``<stage name>_step``."""

    @functools.wraps(method)
    def ranged(self: object, *args: object, **kwargs: object) -> object:
        if not (_RangeState.record or _RangeState.nvtx):
            return method(self, *args, **kwargs)
        with _Range(f"{self.name}_step"):  # type: ignore[attr-defined]
            return method(self, *args, **kwargs)

    return ranged


def set_nvtx(on: bool) -> None:
    """Turn NVTX ranges on (CUDA runs: they cost about a microsecond each) or off."""
    _RangeState.nvtx = bool(on) and torch.cuda.is_available()


# -- profiler -------------------------------------------------------------------------------------


class Profiler:
    """``torch.profiler`` over the training steps with index ``start <= i < end`` (0-based, global).

    The trace goes to ``out_dir`` through ``tensorboard_trace_handler`` (gzipped Chrome trace JSON,
    one file per rank named ``rank<R>.<time>.pt.trace.json.gz``): it opens in TensorBoard's PyTorch
    profiler plugin (torch-tb-profiler), in Perfetto (ui.perfetto.dev) and in chrome://tracing.
    Call :meth:`step` after every training step and :meth:`stop` at the end (also on errors).
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, *, rank: int, device: torch.device, first_step: int = 0) -> None:
        self.prof: torch.profiler.profile | None = None
        self.out_dir = Path(out_dir)
        if steps is None:
            return
        start, end = max(steps[0], first_step), steps[1]
        if end <= start:
            return
        warmup = min(1, start - first_step)  # one warm-up step when there is one before the range
        self._length = start - first_step + (end - start)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        else:  # Kineto's stderr chatter on a CPU-only machine ("ERROR ... gpuGetDeviceCount failed", USDT lines) is no error
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "won't be using warmup" when the range starts at step 0
            self.prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=start - first_step - warmup, warmup=warmup, active=end - start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.out_dir), worker_name=f"rank{rank}", use_gzip=True),
                record_shapes=True,
            )
            self.prof.start()
        self._done = 0
        _RangeState.record = True

    @property
    def active(self) -> bool:
        return self.prof is not None

    def step(self) -> None:
        """Mark the end of one training step; writes the trace after the last step of the range."""
        if self.prof is None:
            return
        self.prof.step()
        self._done += 1
        if self._done >= self._length:
            self.stop()

    def stop(self) -> None:
        """Stop recording (a range cut short by the end of training is still written)."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        _RangeState.record = False
        prof.stop()
