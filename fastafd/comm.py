"""Gradient averaging over processes, per optimizer stage: after the backward, or overlapped with it. Every
collective on gradients and model state lives here (:func:`all_reduce_grads`, :func:`all_reduce_mean_`), with
the one test they start with (:func:`distributed`); :mod:`fastafd.dist` sets up the processes.

fastafd has no DDP wrapper (an AFD iteration runs three stages over different parameter sets; see
:mod:`fastafd.dist`), so each :class:`~fastafd.steps.Stage` averages exactly its own gradients through
a :class:`GradSync`:

* :class:`CoalescedSync` (the reference): one coalesced all-reduce of all the stage's gradients after
  its backward has finished; every byte is on the critical path.
* :class:`OverlappedSync` (the default with several processes): the stage's gradients live in
  persistent flat buckets of about ``system.bucket_mb`` (parameters in reverse registration order,
  about the order backward produces them; each ``p.grad`` a view of its bucket with the parameter's
  own strides, so channels-last parameters keep channels-last gradients, as the fused optimizers
  need), and a post-accumulate-grad hook starts a bucket's all-reduce as soon as its last gradient is
  accumulated, while backward goes on with the earlier layers (DDP's scheme). The bucket holding the
  first parameters is reduced last, when the backward ends, with the stage's non-finite flag riding
  along as one extra element. Gradients are divided by the number of processes before the sum
  (``ReduceOp.AVG`` is NCCL-only), in the reduction's own buffer.
  ``system.grad_compression=bf16`` all-reduces a bf16 copy of each bucket (half the bytes, for thin
  fabrics; rounding of the averaged gradient to bf16), off by default.

In both, a rank's non-finite loss reaches every rank through the flag, and the gradients are checked
(and unscaled, fp16) after the reduction, so every rank checks the same values and takes the same
decision without another collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

if TYPE_CHECKING:
    from fastafd.steps import Stage


class GradSync(Protocol):
    """How a stage's gradients are prepared and averaged over processes."""

    def zero(self, stage: Stage) -> None:
        """Before the stage's backward: gradients cleared (or pointed at zeroed buckets)."""

    def take(self, stage: Stage, grads: Sequence[Tensor | None]) -> None:
        """Precomputed gradients of ``stage.params`` (simultaneous order) become the stage's gradients."""

    def reduce(self, stage: Stage, found_inf: Tensor) -> None:
        """After the backward: average the gradients over processes and OR ``found_inf`` into every rank's."""


def distributed() -> bool:
    """More than one process in an initialized process group (the one test every collective starts with)."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` in place over all processes with one coalesced all-reduce."""
    if not tensors or not distributed():
        return
    flat = _flatten_dense_tensors(tensors)
    tdist.all_reduce(flat)
    flat /= tdist.get_world_size()
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(synced)


def all_reduce_grads(params: Sequence[nn.Parameter], found_inf: Tensor) -> None:
    """Average the gradients of ``params`` over all processes and OR the non-finite flag, in one
    coalesced all-reduce (the flag rides along as the last element)."""
    if not distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors([*grads, found_inf.reshape(1).to(grads[0].dtype if grads else found_inf.dtype)])
    tdist.all_reduce(flat)
    found_inf.copy_((flat[-1] > 0).to(found_inf.dtype))
    flat = flat[:-1] / tdist.get_world_size()
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


class LocalSync:
    """One process: nothing to average."""

    def zero(self, stage: Stage) -> None:
        stage.optimizer.zero_grad(set_to_none=True)

    def take(self, stage: Stage, grads: Sequence[Tensor | None]) -> None:
        for p, g in zip(stage.params, grads, strict=True):
            p.grad = g

    def reduce(self, stage: Stage, found_inf: Tensor) -> None:
        pass


class CoalescedSync(LocalSync):
    """All of a stage's gradients and the flag in one all-reduce, after the backward (the reference path)."""

    def reduce(self, stage: Stage, found_inf: Tensor) -> None:
        all_reduce_grads(stage.params, found_inf)


@dataclass
class _Bucket:
    flat: Tensor
    params: list[nn.Parameter]
    last: bool
    """Reduced when the backward ends, with the flag appended (holds the first parameters)."""
    pending: int = 0
    work: object = None
    wire: Tensor | None = None
    """What travels: ``flat`` itself, or its bf16 copy."""
    ready: set[int] = field(default_factory=set)


@dataclass
class _Plan:
    buckets: list[_Bucket]
    views: list[tuple[nn.Parameter, Tensor]]
    route: dict[int, _Bucket]


class OverlappedSync:
    """Bucketed gradient all-reduce started by post-accumulate-grad hooks during the backward (module docstring)."""

    def __init__(self, bucket_mb: float = 25.0, compression: str = "none") -> None:
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.compression = compression
        self._plans: dict[int, _Plan] = {}
        self._hooked: set[int] = set()
        self._route: dict[int, _Bucket] = {}
        self._world = tdist.get_world_size() if distributed() else 1
        self.launched = {"during_backward": 0, "after_backward": 0}
        """Bucket all-reduces started by the hooks while backward ran, and those started when it ended."""

    # -- set-up --------------------------------------------------------------------------------------

    def _plan(self, stage: Stage) -> _Plan:
        plan = self._plans.get(id(stage))
        if plan is not None:
            return plan
        params = [p for p in reversed(stage.params) if p.requires_grad]
        groups: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:
            if groups[-1] and size + p.numel() * p.element_size() > self.bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel() * p.element_size()
        buckets, views, route = [], [], {}
        for i, group in enumerate(groups):
            last = i == len(groups) - 1
            dtype = group[0].dtype
            assert all(p.dtype == dtype and p.device == group[0].device for p in group), "a bucket holds one dtype and device"
            flat = torch.zeros(sum(p.numel() for p in group) + (1 if last else 0), dtype=dtype, device=group[0].device)
            bucket = _Bucket(flat, group, last)
            offset = 0
            for p in group:
                views.append((p, torch.as_strided(flat[offset:offset + p.numel()], p.shape, p.stride())))
                route[id(p)] = bucket
                offset += p.numel()
            buckets.append(bucket)
        for p in params:
            if id(p) not in self._hooked:
                p.register_post_accumulate_grad_hook(self._on_grad)
                self._hooked.add(id(p))
        plan = self._plans[id(stage)] = _Plan(buckets, views, route)
        return plan

    # -- the three calls -----------------------------------------------------------------------------

    def zero(self, stage: Stage) -> None:
        plan = self._plan(stage)
        for b in plan.buckets:
            b.flat.zero_()
            b.pending, b.work, b.wire, b.ready = len(b.params), None, None, set()
        for p, view in plan.views:
            p.grad = view
        self._route = plan.route

    def take(self, stage: Stage, grads: Sequence[Tensor | None]) -> None:
        plan = self._plan(stage)
        self.zero(stage)
        self._route = {}  # copied in below, reduced all at once in reduce(): nothing to overlap with
        views = dict((id(p), v) for p, v in plan.views)
        for p, g in zip(stage.params, grads, strict=True):
            if g is not None and id(p) in views:
                views[id(p)].copy_(g)
                plan.route[id(p)].ready.add(id(p))

    def reduce(self, stage: Stage, found_inf: Tensor) -> None:
        plan = self._plan(stage)
        self._route = {}
        for b in plan.buckets:
            if b.last:
                b.flat[-1] = found_inf.to(b.flat.dtype)  # the flag rides along with the last bucket
            if b.work is None:
                self._launch(b)
                self.launched["after_backward"] += 1
        for b in plan.buckets:
            if b.work:
                b.work.wait()
            if b.wire is not None and b.wire is not b.flat:
                b.flat.copy_(b.wire)
        last = plan.buckets[-1]
        found_inf.copy_((last.flat[-1] > 0).to(found_inf.dtype))
        for b in plan.buckets:  # a parameter no backward reached keeps no gradient (as in the reference path)
            for p in b.params:
                if id(p) not in b.ready:
                    p.grad = None

    # -- hooks ---------------------------------------------------------------------------------------

    def _on_grad(self, p: nn.Parameter) -> None:
        bucket = self._route.get(id(p))
        if bucket is None or id(p) in bucket.ready:
            return
        bucket.ready.add(id(p))
        bucket.pending -= 1
        if bucket.pending == 0 and not bucket.last:
            self._launch(bucket)
            self.launched["during_backward"] += 1

    def _launch(self, bucket: _Bucket) -> None:
        if self._world == 1:
            bucket.work = False  # launched: nothing to send
            return
        bucket.flat.div_(self._world)  # average in the reduction's buffer (the flag stays > 0 when raised)
        wire = bucket.flat.to(torch.bfloat16) if self.compression == "bf16" else bucket.flat
        bucket.wire = wire
        bucket.work = tdist.all_reduce(wire, async_op=True)


def make_grad_sync(world_size: int, *, overlap: bool, bucket_mb: float, compression: str) -> GradSync:
    """The :class:`GradSync` of a run: local for one process, overlapped (default) or coalesced for several."""
    if world_size == 1:
        return LocalSync()
    return OverlappedSync(bucket_mb, compression) if overlap else CoalescedSync()
