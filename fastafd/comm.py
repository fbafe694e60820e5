"""Gradient averaging over processes, per optimizer stage: after the backward, or overlapped with it. Every
collective on gradients and model state lives here (:func:`all_reduce_grads`, :func:`all_reduce_mean_`), with
the one test they start with (:func:`distributed`); :mod:`fastafd.dist` sets up the processes.

fastafd has no DDP wrapper (an AFD iteration runs three stages over different parameter sets; see
:mod:`fastafd.dist`), so each :class:`~fastafd.steps.Stage` averages exactly its own gradients through
its own :class:`ParamSync`, which the run's :class:`GradSync` makes for the stage's parameters
(:meth:`GradSync.for_params`):

* :class:`CoalescedSync` (the reference): one coalesced all-reduce of all the stage's gradients after
  its backward has finished; every byte is on the critical path.
* :class:`OverlappedSync` (the default with several processes): the stage's gradients live in
  persistent flat buckets of about ``system.bucket_mb`` (parameters in reverse registration order,
  about the order backward produces them; each ``p.grad`` a view of its bucket with the parameter's
  own strides, so channels-last parameters keep channels-last gradients, as the fused optimizers
  need). The backward starts without gradients; a post-accumulate-grad hook copies each fresh gradient
  into its bucket (one pass, where zeroing the buckets and accumulating into them took three) and
  starts a bucket's all-reduce as soon as its last gradient is in, while backward goes on with the earlier layers (DDP's scheme). Buckets start in one
  fixed order on every rank, as DDP's reducer does: bucket i only after buckets 0..i-1 have started
  (a full bucket waits for an earlier one that is still filling), so a parameter that one rank leaves
  without a gradient (a data-dependent branch, stochastic depth) cannot swap the order of the
  collectives between ranks; buckets that never fill start when the backward ends, in order. The
  bucket holding the first parameters is reduced last, when the backward ends, with one "has a
  gradient" mark per parameter and the stage's non-finite flag riding along. Gradients are divided by
  the number of processes before the sum (``ReduceOp.AVG`` is NCCL-only), in the reduction's own
  buffer.
  ``system.grad_compression=bf16`` all-reduces a bf16 copy of each bucket (half the bytes, for thin
  fabrics; rounding of the averaged gradient to bf16), off by default.

In both, a parameter without a gradient on some ranks counts as a zero gradient there, and gets the
average on every rank; one without a gradient on every rank keeps none (the optimizer skips it). Only
a rank that lacks some gradient reads the marks back to the host (a sync, in that case only). A rank's
non-finite loss reaches every rank through the flag, and the gradients are checked
(and unscaled, fp16) after the reduction, so every rank checks the same values and takes the same
decision without another collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class ParamSync(Protocol):
    """How one stage's gradients (its parameters, its optimizer) are prepared and averaged over processes."""

    def zero(self) -> None:
        """Before the stage's backward: gradients cleared."""

    def take(self, grads: Sequence[Tensor | None]) -> None:
        """Precomputed gradients of the stage's parameters (simultaneous order) become its gradients."""

    def reduce(self, found_inf: Tensor) -> None:
        """After the backward: average the gradients over processes and OR ``found_inf`` into every rank's."""


class GradSync(Protocol):
    """A run's way of averaging gradients: it makes each stage's :class:`ParamSync`."""

    def for_params(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> ParamSync:
        """The sync of the stage that steps ``optimizer`` over ``params``."""


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


def all_reduce_grads(params: Sequence[nn.Parameter], found_inf: torch.Tensor) -> None:
    """Average the gradients of ``params`` over all processes and OR the non-finite flag, in one
    coalesced all-reduce (per parameter a "has a gradient" mark, then the flag, ride along at the end).

    A parameter without a gradient on this rank counts as zero here, so every rank sends the same
    elements in the same order; it gets the average if another rank had a gradient, and stays without
    one if none had. Only a rank that lacks some gradient reads the marks back (a host sync)."""
    if not distributed():
        return
    params = [p for p in params if p.requires_grad]
    missing = [i for i, p in enumerate(params) if p.grad is None]
    dtype = params[0].dtype if params else found_inf.dtype
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    marks = torch.ones(len(params), dtype=dtype, device=found_inf.device)
    if missing:
        marks[missing] = 0
    flat = _flatten_dense_tensors([*grads, marks, found_inf.reshape(1).to(dtype)])
    tdist.all_reduce(flat)
    found_inf.copy_((flat[-1] > 0).to(found_inf.dtype))
    n = len(params)
    averaged = _unflatten_dense_tensors(flat[:-1 - n] / tdist.get_world_size(), grads)
    anywhere = (flat[-1 - n:-1] > 0).tolist() if missing else None  # host read: only on a rank that lacks a gradient
    for i, (p, synced) in enumerate(zip(params, averaged, strict=True)):
        if p.grad is not None:
            p.grad.copy_(synced)
        elif anywhere is not None and anywhere[i]:
            p.grad = torch.empty_like(p).copy_(synced)


class _LocalParams:
    """One process: nothing to average."""

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.params, self.optimizer = list(params), optimizer

    def zero(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def take(self, grads: Sequence[Tensor | None]) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g

    def reduce(self, found_inf: Tensor) -> None:
        pass


class _CoalescedParams(_LocalParams):
    def reduce(self, found_inf: Tensor) -> None:
        all_reduce_grads(self.params, found_inf)


class LocalSync:
    """One process: nothing to average."""

    def for_params(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> ParamSync:
        return _LocalParams(params, optimizer)


class CoalescedSync:
    """All of a stage's gradients and the flag in one all-reduce, after the backward (the reference path)."""

    def for_params(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> ParamSync:
        return _CoalescedParams(params, optimizer)


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
    marks: Tensor
    """In the last bucket, before the flag: one element per parameter (plan order), 1 if it has a gradient."""
    view: dict[int, Tensor] = field(default_factory=dict)
    """``id(p)`` -> ``p``'s gradient view in its bucket (the ``views`` by parameter)."""
    next: int = 0
    """The first bucket not started yet: buckets start in plan order."""


class _OverlappedParams:
    """One stage's buckets (its plan, made at its first use) in the run's :class:`OverlappedSync`."""

    def __init__(self, owner: OverlappedSync, params: Sequence[nn.Parameter]) -> None:
        self.owner, self.params = owner, list(params)
        self._plan: _Plan | None = None

    @property
    def plan(self) -> _Plan:
        if self._plan is None:
            self._plan = self.owner._make_plan(self.params)
        return self._plan

    def zero(self) -> None:
        self.owner.zero(self.plan)

    def take(self, grads: Sequence[Tensor | None]) -> None:
        self.owner.take(self.plan, self.params, grads)

    def reduce(self, found_inf: Tensor) -> None:
        self.owner.reduce(self.plan, found_inf)


class OverlappedSync:
    """Bucketed gradient all-reduce started by post-accumulate-grad hooks during the backward (module docstring)."""

    def __init__(self, bucket_mb: float = 25.0, compression: str = "none") -> None:
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.compression = compression
        self._hooked: set[int] = set()
        self._route: dict[int, _Bucket] = {}
        self._active: _Plan | None = None
        self._world = tdist.get_world_size() if distributed() else 1
        self.launched = {"during_backward": 0, "after_backward": 0}
        """Bucket all-reduces started by the hooks while backward ran, and those started when it ended."""

    def for_params(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> ParamSync:
        return _OverlappedParams(self, params)

    # -- set-up --------------------------------------------------------------------------------------

    def _make_plan(self, stage_params: Sequence[nn.Parameter]) -> _Plan:
        params = [p for p in reversed(stage_params) if p.requires_grad]
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
            flat = torch.zeros(sum(p.numel() for p in group) + (len(params) + 1 if last else 0), dtype=dtype, device=group[0].device)
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
        marks = buckets[-1].flat[-1 - len(params):-1]
        return _Plan(buckets, views, route, marks, view={id(p): v for p, v in views})

    # -- the three calls of a stage's sync -------------------------------------------------------------

    def zero(self, plan: _Plan) -> None:
        """Before the backward: no gradients, so that autograd hands each parameter its fresh gradient and
        the hook copies it into the bucket once (DDP's ``gradient_as_bucket_view`` path), instead of
        zeroing every bucket and accumulating into it (two more passes over the stage's gradients)."""
        for b in plan.buckets:
            b.pending, b.work, b.wire, b.ready = len(b.params), None, None, set()
        for p, _ in plan.views:
            p.grad = None
        plan.next = 0
        self._route, self._active = plan.route, plan

    def take(self, plan: _Plan, params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
        self.zero(plan)
        self._route = {}  # copied in below, reduced all at once in reduce(): nothing to overlap with
        for p, g in zip(params, grads, strict=True):
            if g is not None and id(p) in plan.view:
                plan.view[id(p)].copy_(g)
                p.grad = plan.view[id(p)]
                plan.route[id(p)].ready.add(id(p))

    def reduce(self, plan: _Plan, found_inf: Tensor) -> None:
        self._route = {}
        local = [id(p) in b.ready for b in plan.buckets for p in b.params]  # plan order, as the marks
        last = plan.buckets[-1]
        last.flat[-1] = found_inf.to(last.flat.dtype)  # the flag rides along with the last bucket
        if not all(local):
            for (p, view), has in zip(plan.views, local, strict=True):
                if not has:  # no gradient on this rank: a zero one in the sum (its bucket has not started)
                    view.zero_()
                    p.grad = view
            plan.marks.copy_(torch.tensor(local, dtype=plan.marks.dtype))
        else:
            plan.marks.fill_(1)
        while plan.next < len(plan.buckets):  # those the hooks did not start, in plan order, the last one last
            self._launch(plan.buckets[plan.next])
            plan.next += 1
            self.launched["after_backward"] += 1
        for b in plan.buckets:
            if b.work:
                b.work.wait()
            if b.wire is not None and b.wire is not b.flat:
                b.flat.copy_(b.wire)
        found_inf.copy_((last.flat[-1] > 0).to(found_inf.dtype))
        if not all(local):  # a parameter no backward reached on any rank keeps no gradient (as in the reference path)
            anywhere = (plan.marks > 0).tolist()  # host read: only on a rank that lacks a gradient
            for (p, _), used in zip(plan.views, anywhere, strict=True):
                if not used:
                    p.grad = None

    # -- hooks ---------------------------------------------------------------------------------------

    def _on_grad(self, p: nn.Parameter) -> None:
        bucket = self._route.get(id(p))
        if bucket is None or id(p) in bucket.ready:
            return
        view = self._active.view[id(p)]
        if p.grad is not view:  # the fresh gradient autograd handed over: into the bucket, the bucket's view as .grad
            view.copy_(p.grad)
            p.grad = view
        bucket.ready.add(id(p))
        bucket.pending -= 1
        plan = self._active
        while plan.next < len(plan.buckets):  # start every full bucket whose predecessors have all started
            b = plan.buckets[plan.next]
            if b.pending or b.last:
                break
            self._launch(b)
            plan.next += 1
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
