"""Observability: TensorBoard scalars, profiler traces, trace ranges, progress output.

Nothing in this module reads a device value. The trainer hands over the host values it already
read at its log interval (``RunningMeans.means()``, the loop's only device-to-host sync, every
``loop.log_interval`` steps), so TensorBoard logging, the progress bar and the data-wait clock add
no synchronisation to the training loop.

**Data-wait fraction.** :class:`LoopClock` adds up the host time spent inside ``next()`` of the
training loader (with ``perf_counter``) and divides it by the wall time between two log points.
Both ends of that interval are host syncs (``means()``), so the wall time is the real time the
device took for those steps even though CUDA runs asynchronously in between; ``next()`` returns as
soon as the loader has a batch ready (DALI prefetches on its own threads and stream), so time spent
there is time the training loop could not enqueue work because input was not ready. It is measured
on rank 0 only. It is a host-side measure: while the host is ahead of the GPU, a slow ``next()``
may still be hidden behind queued GPU work, so the fraction is an upper bound on the time the GPU
idled for data (0 % means the input pipeline is never the bottleneck).

**Trace ranges.** :func:`trace_range` names a region in profiler traces (``record_function``, only
while a profile is being recorded) and in Nsight Systems (NVTX, on CUDA). Otherwise it returns a
shared ``nullcontext``: a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import torch

from fastafd.errors import UserError

TB_DIR = "tensorboard"
"""Run subfolder with the TensorBoard event files (``tensorboard --logdir RUN``)."""

PROFILE_DIR = "profile"
"""Run subfolder with the profiler traces (``rank<R>.<time>.pt.trace.json.gz``)."""

def require(module: str, extra: str, purpose: str, alternative: str = "", package: str = "") -> ModuleType:
    """Import an optional dependency, or raise a one-line :class:`UserError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = f", or {alternative}" if alternative else ""
        raise UserError(f"{purpose} needs the optional package {package or module}: pip install 'fastafd[{extra}]'{hint}") from None


def tensorboard_enabled(mode: str) -> bool:
    """``log.tensorboard``: on needs the package, auto uses it when installed, off never."""
    if mode == "off":
        return False
    installed = importlib.util.find_spec("tensorboard") is not None
    if mode == "on" and not installed:
        raise UserError("TensorBoard logging (--log.tensorboard on) needs the optional package tensorboard: "
                        "pip install 'fastafd[tensorboard]', or use --log.tensorboard off")
    return installed


def peer_labels(names: Sequence[str]) -> list[str]:
    """Tag suffix of each peer: ``peer<k>-<timm name>`` (unique even when all peers share a name)."""
    return [f"peer{k}-{name}" for k, name in enumerate(names)]


# -- trace ranges ---------------------------------------------------------------------------------


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


# -- clocks and interval means --------------------------------------------------------------------


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


# -- TensorBoard ----------------------------------------------------------------------------------


class Scalars:
    """The run's scalars (create it on rank 0 only), to TensorBoard and to the experiment trackers of
    :mod:`fastafd.trackers` (``trackers``: an object with ``log(values, step)`` and ``close()``), the same
    tags everywhere. Tags: see :func:`train_tags`, :func:`eval_tags`."""

    def __init__(self, run_dir: Path, names: Sequence[str], config: dict | None = None, purge_step: int | None = None,
                 eval_keys: Sequence[str] = (), *, tensorboard: bool = True, trackers: object | None = None) -> None:
        self.eval_keys = ("top1", "top5", *eval_keys)  # eval_keys: the method's per-peer evaluation extras
        self.writer = None
        self.trackers = trackers
        if tensorboard:
            tb = require("torch.utils.tensorboard", "tensorboard", "TensorBoard logging", "use --log.tensorboard off", package="tensorboard")
            # purge_step: a resumed run hides the events a killed run wrote after its checkpoint
            self.writer = tb.SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR), purge_step=purge_step)
            if purge_step is not None:
                self._restart(purge_step)
            if config is not None:
                self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.peers = peer_labels(names)

    def _restart(self, step: int) -> None:
        """Mark a restart at ``step`` the way TensorBoard's Python reader understands it too (a SessionLog START
        event: events of earlier files at ``step`` or later are dropped). purge_step alone is honoured by the
        Rust data server and EventAccumulator, but ``tensorboard --load_fast=false`` (also its fallback where the
        Rust server is missing) showed the killed run's steps twice."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))  # type: ignore[union-attr]

    def _emit(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.trackers is not None:
            self.trackers.log(values, step)  # type: ignore[attr-defined]

    def train(self, step: int, means: Mapping[str, list[float]], lrs: Mapping[str, float], img_per_s: float, data_wait: float) -> None:
        """Interval means of the step metrics (per peer), the stages' learning rates, throughput."""
        values: dict[str, float] = {}
        for key, per_peer in means.items():
            if len(per_peer) == len(self.peers):
                for label, value in zip(self.peers, per_peer, strict=True):
                    values[f"train/{key}/{label}"] = value
        for stage, lr in lrs.items():
            values[f"lr/{stage}"] = lr
        values["perf/img_per_s"] = img_per_s
        values["perf/data_wait_frac"] = data_wait
        self._emit(values, step)

    def eval(self, step: int, row: Mapping) -> None:
        """Validation accuracy per peer and of the ensemble, and the method's per-peer extras (afd: d_real, d_fake)."""
        values: dict[str, float] = {}
        for label, peer in zip(self.peers, row["peers"], strict=True):
            for key in self.eval_keys:
                if key in peer:
                    values[f"val/{key}/{label}"] = peer[key]
        values["val/top1/ensemble"] = row["ensemble_top1"]
        values["val/top5/ensemble"] = row["ensemble_top5"]
        self._emit(values, step)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            if self.trackers is not None:
                self.trackers.close()  # type: ignore[attr-defined]


def train_tags(names: Sequence[str], metric_keys: Iterable[str], stages: Iterable[str]) -> set[str]:
    """The tags :meth:`Scalars.train` writes for these peers, step metrics and stages."""
    tags = {f"train/{k}/{p}" for k in metric_keys for p in peer_labels(names)}
    return tags | {f"lr/{s}" for s in stages} | {"perf/img_per_s", "perf/data_wait_frac"}


def eval_tags(names: Sequence[str], extras: Iterable[str] = ()) -> set[str]:
    """The tags :meth:`Scalars.eval` writes (``extras``: per-peer keys such as d_real, d_fake)."""
    keys = ("top1", "top5", *extras)
    return {f"val/{k}/{p}" for k in keys for p in peer_labels(names)} | {"val/top1/ensemble", "val/top5/ensemble"}


# -- console --------------------------------------------------------------------------------------


def format_losses(means: Mapping[str, list[float]], keys: Sequence[str], sep: str = " ") -> str:
    """``ce 1.234/1.250 kl ...``: the losses ``keys`` (the method's ``loss_keys``), one value per peer."""
    return sep.join(f"{k} " + "/".join(f"{v:.3f}" for v in means[k]) for k in keys if k in means)


def duration(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``: an estimate, in words."""
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """Per-epoch progress on rank 0: a tqdm bar on a terminal, plain lines in logs (Slurm), or nothing.

    ``mode`` is ``log.progress``: auto is a bar when stderr is a terminal and lines otherwise.
    """

    def __init__(self, mode: str, *, enabled: bool, epoch: int, epochs: int, steps: int, batch: int, loss_keys: Sequence[str]) -> None:
        self.loss_keys = tuple(loss_keys)
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self.epoch, self.epochs, self.steps, self.batch = epoch, epochs, steps, batch
        self.t0 = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps * batch, unit="img", unit_scale=True, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True, leave=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(self.batch)

    def log(self, done: int, means: Mapping[str, list[float]], img_per_s: float, data_wait: float) -> None:
        """At a log point: interval img/s, data-wait fraction and the main losses."""
        if self.bar is not None:
            post = {"img/s": f"{img_per_s:.0f}", "data": f"{data_wait:.0%}"}
            post.update({k: "/".join(f"{v:.3f}" for v in means[k]) for k in self.loss_keys if k in means})
            self.bar.set_postfix(post)
        elif self.mode == "lines":
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (self.steps - done) if done else 0.0
            write(
                f"epoch {self.epoch}/{self.epochs} step {done}/{self.steps}  {img_per_s:.0f} img/s  data {data_wait:.0%}  "
                f"ETA {_clock(eta)}  {format_losses(means, self.loss_keys)}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write(line: str) -> None:
    """Print a line without breaking an active progress bar (stdout, flushed)."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def warn(line: str) -> None:
    """A one-line warning on stderr (``fastafd: warning: ...``), not broken by a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"fastafd: warning: {line}", file=sys.stderr)
    sys.stderr.flush()


def epoch_summary(row: Mapping, epochs: int, means: Mapping[str, list[float]], loss_keys: Sequence[str], extras: str = "") -> str:
    """The one line printed after each evaluated epoch (``extras``: the method's ``describe_eval`` text)."""
    tops = "  ".join(f"{p['name']} {p['top1']:.2f}" for p in row["peers"])
    extras = f"  {extras}" if extras else ""
    return (
        f"epoch {row['epoch']}/{epochs}  top-1: {tops}  ensemble {row['ensemble_top1']:.2f}  {format_losses(means, loss_keys)}{extras}  "
        f"{row['img_per_s']:.0f} img/s  data {row.get('data_wait_frac', 0.0):.0%}  {row['time_s']:.1f} s"
    )
