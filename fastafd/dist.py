"""Processes and devices: HF accelerate sets up the process group (NCCL on GPUs, gloo on CPU).

fastafd uses accelerate for launching, the process group, device placement and collectives, but
does not hand its modules to ``accelerator.prepare``: an AFD iteration runs three optimizer stages
over different parameter subsets and two forward passes of the feature extractors, which DDP's
one-forward-one-backward reducer can only follow with ``find_unused_parameters``. Instead each
stage averages exactly its own gradients (:func:`all_reduce_grads`, one coalesced all-reduce per
stage), and BatchNorm running statistics are averaged over processes before every evaluation and
checkpoint (:func:`average_buffers`), so every rank holds the same model.

Failures: the process group has a timeout (``system.dist_timeout_s``), so a collective never waits
forever for a silent peer, and a :class:`PeerWatch` heartbeat in the rendezvous store lets the
survivors of a failed collective name the rank that stopped (a peer that dies is seen at once:
its sockets close). Under ``accelerate launch`` on one node, torchrun's agent also watches its
children: when one dies it stops the others and prints the failed rank.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fastafd.config import SystemConfig
from fastafd.errors import UserError


@dataclass
class Runtime:
    """Where and how this process runs."""

    accelerator: object  # accelerate.Accelerator
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
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
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
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


class PeerWatch:
    """A heartbeat per rank in the rendezvous store, so that after a failed collective the survivors
    can name the rank that stopped.

    A daemon thread increments ``fastafd/beat/<rank>`` every :data:`HEARTBEAT_S` seconds (a few bytes
    per rank per period to the store; no device work, no effect on the training step). Under
    torchrun the store lives in the launcher of node 0, so it outlives any training process.
    """

    def __init__(self, rank: int, world_size: int, period_s: float = HEARTBEAT_S) -> None:
        from torch.distributed.distributed_c10d import _get_default_store  # the rendezvous store

        self.rank, self.world_size, self.period_s = rank, world_size, period_s
        self._store = _get_default_store()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="fastafd-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"fastafd/beat/{rank}"

    def _beat(self) -> None:
        self._store.add(self._key(self.rank), 1)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._beat()
            except Exception:  # the store is gone (node 0's launcher died): failed_ranks() reports it
                return

    def _counts(self) -> list[int]:
        keys = [self._key(r) for r in range(self.world_size)]
        return [int(v) for v in self._store.multi_get(keys)]

    def failed_ranks(self) -> list[int] | None:
        """Ranks whose heartbeat stopped (waits three periods); None if the store itself is unreachable."""
        try:
            before = self._counts()
            time.sleep(3 * self.period_s)
            after = self._counts()
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def describe(self, error: BaseException, failed: list[int] | None) -> str:
        """One line for a collective that failed on this rank: which rank stopped, and what to do."""
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        if failed is None:
            who = "the rendezvous store on the head node is unreachable: rank 0 or its node failed"
        elif failed:
            who = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of {self.world_size} stopped (process died or node lost)"
        else:
            who = "no other rank stopped its heartbeat (a network fault or a rank stuck beyond system.dist_timeout_s)"
        return f"rank {self.rank}: a collective failed: {who}; see that rank's log for the cause. ({first})"

    def explain(self, error: BaseException) -> str | None:
        """One line naming the ranks that stopped, if any did (else None: the error is this rank's own)."""
        failed = self.failed_ranks()
        return self.describe(error, failed) if failed is None or failed else None

    def close(self) -> None:
        self._stop.set()


def peer_watch(rt: Runtime) -> PeerWatch | None:
    """A :class:`PeerWatch` when several processes train, else None."""
    return PeerWatch(rt.rank, rt.world_size) if _distributed() else None


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce: a host sync)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())
