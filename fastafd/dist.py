"""Processes and devices: HF accelerate sets up the process group (NCCL on GPUs, gloo on CPU).

fastafd uses accelerate for launching, the process group, device placement and collectives, but
does not hand its modules to ``accelerator.prepare``: an AFD iteration runs three optimizer stages
over different parameter subsets and two forward passes of the feature extractors, which DDP's
one-forward-one-backward reducer can only follow with ``find_unused_parameters``. Instead each
stage averages exactly its own gradients (:func:`all_reduce_grads`, one coalesced all-reduce per
stage), and BatchNorm running statistics are averaged over processes before every evaluation and
checkpoint (:func:`average_buffers`), so every rank holds the same model.

Failures: every rank beats a heartbeat in the rendezvous store and watches the others'
(:class:`PeerWatch`, a thread): a rank that dies, hangs as a whole process or loses its node makes
the survivors exit within ``system.peer_timeout_s`` with one line naming it, on gloo and on NCCL
alike (on NCCL a collective with a dead peer never raises). The process group also has a timeout
(``system.dist_timeout_s``), and on gloo a peer that dies is seen at once (its sockets close).
Under ``accelerate launch`` on one node, torchrun's agent also watches its children: when one dies
it stops the others.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fastafd.config import SystemConfig
from fastafd.errors import UserError, record_error

T = TypeVar("T")


@dataclass
class Runtime:
    """Where and how this process runs."""

    accelerator: object  # accelerate.Accelerator
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    dtype: torch.dtype
    channels_last: bool
    compile: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup(cfg: SystemConfig) -> Runtime:
    """Create the accelerator and resolve the ``auto`` settings for this device."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("system.device=cuda but CUDA is not available: use --system.device auto or cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout_s))
    accelerator = Accelerator(cpu=not use_cuda, kwargs_handlers=[timeout])
    device = accelerator.device
    dtype, channels_last, compile_ = resolve_numerics(cfg, device)
    return Runtime(
        accelerator=accelerator,
        device=device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        dtype=dtype,
        channels_last=channels_last,
        compile=compile_,
    )


def resolve_numerics(cfg: SystemConfig, device: torch.device) -> tuple[torch.dtype, bool, bool]:
    """The ``auto`` defaults per device: (autocast dtype, channels-last, torch.compile)."""
    on_gpu = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if precision == "fp16" and not on_gpu:
        raise UserError("system.precision=fp16 needs a GPU: use fp32 or bf16 on CPU")
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and on_gpu)
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and on_gpu)
    return _DTYPES[precision], channels_last, compile_


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` in place over all processes with one coalesced all-reduce."""
    if not tensors or not _distributed():
        return
    flat = _flatten_dense_tensors(tensors)
    tdist.all_reduce(flat)
    flat /= tdist.get_world_size()
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(synced)


def all_reduce_grads(params: Sequence[nn.Parameter], found_inf: torch.Tensor) -> None:
    """Average the gradients of ``params`` over all processes and OR the non-finite flag, in one
    coalesced all-reduce (the flag rides along as the last element)."""
    if not _distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors([*grads, found_inf.reshape(1).to(grads[0].dtype if grads else found_inf.dtype)])
    tdist.all_reduce(flat)
    found_inf.copy_((flat[-1] > 0).to(found_inf.dtype))
    flat = flat[:-1] / tdist.get_world_size()
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes."""
    _all_reduce_mean_([b for b in module.buffers() if b.is_floating_point()])


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum a dict of tensors over processes (evaluation counts)."""
    if not _distributed():
        return tensors
    out = {}
    for key, t in tensors.items():
        t = t.clone()
        tdist.all_reduce(t)
        out[key] = t
    return out


HEARTBEAT_S = float(os.environ.get("FASTAFD_HEARTBEAT_S", "2"))
"""Seconds between two heartbeats of a rank in the rendezvous store (``FASTAFD_HEARTBEAT_S``)."""

DONE = 1 << 40
"""Added to a rank's heartbeat count when it finishes training normally: the others stop watching it."""
FAILED = 1 << 50
"""Added when a rank stops with an error: the others exit at once, naming it, instead of waiting in a collective."""


def _say(line: str) -> None:
    """The watchdog's last words: one line on stderr, then exit 1 without unwinding the blocked main thread."""
    sys.stderr.write(f"fastafd: error: {line}\n")
    sys.stderr.flush()
    record_error(f"fastafd: error: {line}", 1, printed=True)  # the launcher then adds no line of its own (a SIGSTOPped peer)
    sys.stdout.flush()
    os._exit(1)


def launcher_gone(silent_for: str = "") -> str:
    """The rendezvous store is unreachable: it lives in node 0's launcher, so that launcher is gone (killed, the OOM
    killer, its node lost); the ranks cannot tell which, and the cause is not theirs."""
    since = f" (its rendezvous store unreachable {silent_for})" if silent_for else ""
    return f"the launcher on node 0 is gone{since}; the last checkpoint is kept: run the same command again to resume"


class PeerWatch:
    """A heartbeat per rank in the rendezvous store, and a watchdog thread on every rank that reads them.

    A daemon thread increments ``fastafd/beat/<rank>`` every period and reads every rank's count. A
    rank whose count has not moved for ``timeout_s`` is dead, stopped or hung as a whole process
    (SIGSTOP, a node lost): the watchdog prints one line naming it and exits this process with code 1.
    That works whatever the main thread is blocked in: on NCCL a collective with a dead peer does not
    raise, it blocks until the process-group timeout, after which NCCL's own watchdog aborts the
    process without a Python exception, so without this thread the survivors would say nothing for
    ``system.dist_timeout_s`` and then die silently. A rank that stops with an error marks itself
    (:data:`FAILED`) so that the others exit at once; one that finishes marks itself :data:`DONE`.

    The heartbeat runs in the training process itself, so a busy rank (a long checkpoint write, a
    cold compile, a slow evaluation) keeps beating; only a process that no longer runs at all stops.
    Under torchrun the store lives in the launcher of node 0, so it outlives any training process.
    Cost: a few bytes per rank per period to the store; no device work, no effect on the training step.
    With W ranks each reads W counts per period, so the period grows as W^2 / 10,000 s beyond 140
    ranks (W = 512: 26 s) to keep the store's load bounded, and the timeout is at least three periods.
    """

    def __init__(self, rank: int, world_size: int, *, timeout_s: float, period_s: float | None = None,
                 on_lost: Callable[[str], None] = _say) -> None:
        from torch.distributed.distributed_c10d import _get_default_store  # the rendezvous store

        self.rank, self.world_size = rank, world_size
        self.period_s = max(HEARTBEAT_S if period_s is None else period_s, world_size**2 / 10_000)
        self.timeout_s = max(float(timeout_s), 3 * self.period_s)
        self._on_lost = on_lost
        self._store = _get_default_store()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # close() and the watchdog's verdict exclude each other
        self._closed = False
        self._beat()
        self._thread = threading.Thread(target=self._run, name="fastafd-peer-watch", daemon=True)
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"fastafd/beat/{rank}"

    def _beat(self, amount: int = 1) -> None:
        self._store.add(self._key(self.rank), amount)

    def _counts(self) -> list[int]:
        keys = [self._key(r) for r in range(self.world_size)]
        return [int(v) for v in self._store.multi_get(keys)]

    def _run(self) -> None:
        seen: list[int] | None = None
        moved = [time.monotonic()] * self.world_size
        store_ok = time.monotonic()
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            try:
                self._beat()
                counts = self._counts()
            except Exception:  # the store is gone: node 0's launcher (or rank 0 hosting it) failed
                if now - store_ok > self.timeout_s:
                    self._verdict(self.describe(None, None, f"for {now - store_ok:.0f} s"))
                    return
                continue
            store_ok = now
            if seen is not None:
                moved = [now if c != s else m for c, s, m in zip(counts, seen, moved, strict=True)]
            seen = counts
            failed = [r for r, c in enumerate(counts) if r != self.rank and c >= FAILED]
            lost = [r for r, c in enumerate(counts) if r != self.rank and c < DONE and now - moved[r] > self.timeout_s]
            if failed:
                # all ranks often stop together (the non-finite stop, a preemption error): give this
                # rank's own error two periods to surface before speaking for it
                if not self._stop.wait(2 * self.period_s):
                    self._verdict(self.describe(None, failed, "", what="stopped with an error"))
                return
            if lost:
                self._verdict(self.describe(None, lost, f"for {now - min(moved[r] for r in lost):.0f} s"))
                return

    def _verdict(self, line: str) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._on_lost(line)

    def failed_ranks(self) -> list[int] | None:
        """Ranks that stopped (marked failed, or no heartbeat for three periods); None if the store is unreachable."""
        try:
            before = self._counts()
            if any(c >= FAILED for r, c in enumerate(before) if r != self.rank):
                return [r for r, c in enumerate(before) if r != self.rank and c >= FAILED]
            time.sleep(3 * self.period_s)
            after = self._counts()
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r] and after[r] < DONE]

    def describe(self, error: BaseException | None, failed: list[int] | None, silent_for: str = "", *,
                 what: str = "stopped (process died or hung, or node lost)") -> str:
        """One line: which rank stopped, and what to do (``error``: the failed collective, if any)."""
        if failed is None:
            return f"rank {self.rank}: {launcher_gone(silent_for)}"
        elif failed:
            beat = f"; no heartbeat {silent_for}" if silent_for else ""
            who = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of {self.world_size} {what}{beat}"
        else:
            who = "no other rank stopped its heartbeat (a network fault or a rank stuck beyond system.dist_timeout_s)"
        head = f"rank {self.rank}: a collective failed: " if error is not None else f"rank {self.rank}: "
        tail = ""
        if error is not None:
            tail = f" ({str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__})"
        return f"{head}{who}; see that rank's log for the cause; the last checkpoint is kept.{tail}"

    def explain(self, error: BaseException) -> str | None:
        """One line naming the ranks that stopped, if any did (else None: the error is this rank's own)."""
        failed = self.failed_ranks()
        return self.describe(error, failed) if failed is None or failed else None

    def close(self, *, failed: bool = False) -> None:
        """Stop beating; mark this rank done (or failed) so that the others stop watching it (or exit)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
        try:
            self._beat(FAILED if failed else DONE)
        except Exception:  # the store is gone already
            pass


def peer_watch(rt: Runtime, timeout_s: float) -> PeerWatch | None:
    """A :class:`PeerWatch` when several processes train, else None."""
    return PeerWatch(rt.rank, rt.world_size, timeout_s=timeout_s) if _distributed() else None


def local_main_first(rt: Runtime, fn: Callable[[], T]) -> T:
    """``fn()`` on each node's local main process first (it may download or generate data), then on the others.

    Unlike accelerate's ``local_main_process_first`` (a barrier), a failure on a local main is not left
    to the waiting ranks as a transport error and a traceback each: every rank learns it through one
    ``all_gather_object`` and raises it as its own one-line :class:`UserError` (the launcher prints only
    rank 0's), so a bad ``--data`` gives one line however many processes run.
    """
    if not _distributed():
        return fn()
    error: str | None = None
    result = None
    if rt.local_rank == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
            raise
        except Exception as e:
            error = f"rank {rt.rank} failed to open the data ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}): see its log"
            raise
        finally:
            _share_error(error)
        return result  # type: ignore[return-value]
    errors = _share_error(None)
    if (first := next((e for e in errors if e), None)) is not None:
        raise UserError(first)
    return fn()


def _share_error(error: str | None) -> list[str | None]:
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, error)
    return out


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks, on every rank (one tiny all-reduce: a host sync)."""
    if not _distributed():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float32)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())
