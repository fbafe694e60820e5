"""Optimizer stages: the unit that turns one loss into one parameter update.

A method's iteration is a sequence of stages (AFD: logit step with SGD, then discriminator step and
feature step with Adam). Each :class:`Stage` zeroes its own gradients, back-propagates its loss into
its own parameters only (``backward(inputs=...)``: a frozen discriminator gets no gradient), averages
the gradients over processes, and steps its optimizer.

All stages of an iteration share one :class:`StepGuard`: a non-finite loss or a non-finite gradient
(any precision: one fused check over the stage's gradients, on the device) on any rank sets one
device-side flag, and every later optimizer step of the iteration is skipped on every rank,
BatchNorm statistics included. With torch's fused optimizers (the default on CUDA and CPU) the skip
happens inside the optimizer kernels (``found_inf``), so the hot path never reads a value back to
the host; other implementations read the flag (a host sync) and skip the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastafd.comm import GradSync, LocalSync, ParamSync
from fastafd.observe.profile import stage_range


class StepGuard:
    """Per-iteration non-finite detection shared by all stages and ranks, and the fp16 loss scale."""

    def __init__(self, device: torch.device, *, fp16: bool = False, buffers: Sequence[Tensor] = ()) -> None:
        self.device = device
        self.found_inf = torch.zeros((), device=device, dtype=torch.float32)  # fused kernels read it as float
        self._one = torch.ones((), device=device, dtype=torch.float32)
        self.skipped = torch.zeros((), device=device, dtype=torch.float32)
        """Skipped iterations since the start (a device tensor; read it at log time)."""
        self.streak = torch.zeros((), device=device, dtype=torch.float32)
        """Current run of consecutive skipped iterations."""
        self.longest_streak = torch.zeros((), device=device, dtype=torch.float32)
        self.longest_end = torch.zeros((), device=device, dtype=torch.float32)
        """Iteration count (= global step, 1-based) at which the longest streak last grew."""
        self.count = torch.zeros((), device=device, dtype=torch.float32)
        """Iterations finished (kept on the device so that no step number crosses to it per step)."""
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        self.host_reads = device.type == "cpu"
        """Read the flag on the host to restore only when needed (CPU: synchronous, so free); else restore
        with device-side selects, a few launches whatever the number of buffers."""
        self._buffers = list(buffers)
        # per dtype: 1-D views of the buffers, and two flat tensors (the saved copy, the select's output) split
        # into matching parts, all made once: each call below is then a fixed number of ops, however many buffers
        self._flat: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._chosen: list[Tensor] = []
        self._gather: list[tuple[list[Tensor], Tensor, Tensor]] = []
        for dtype in dict.fromkeys(b.dtype for b in self._buffers):
            flat = [b.view(-1) for b in self._buffers if b.dtype == dtype]  # views: a non-contiguous buffer raises here
            sizes = [v.numel() for v in flat]
            saved, chosen = (torch.empty(sum(sizes), dtype=dtype, device=flat[0].device) for _ in range(2))
            self._flat += flat
            self._saved += saved.split(sizes)
            self._chosen += chosen.split(sizes)
            self._gather.append((flat, saved, chosen))

    def begin(self) -> None:
        """Start an iteration: clear the flag, remember the BatchNorm statistics."""
        self.found_inf.zero_()
        if self._buffers:
            torch._foreach_copy_(self._saved, self._flat)

    def check(self, loss: Tensor) -> None:
        """Raise the flag if ``loss`` is NaN or infinite (device-side)."""
        self.found_inf.copy_(torch.maximum(self.found_inf, (~torch.isfinite(loss.detach())).to(self.found_inf.dtype)))

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def check_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise the flag if any gradient of ``optimizer``'s parameters is NaN or infinite (device-side).

        fp16: the scaler unscales the gradients in place and checks them in the same kernel. Otherwise
        one fused kernel checks them (torch's ``_amp_foreach_non_finite_check_and_unscale_`` with a
        scale of 1, which leaves the values bitwise unchanged): a finite loss can still give an inf
        gradient, in bf16 and fp32 too, and one such step would poison Adam's moments for good.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            state = self.scaler._per_optimizer_states[id(optimizer)]  # torch keeps the per-device flags here
            for flag in state["found_inf_per_device"].values():
                self.found_inf.copy_(torch.maximum(self.found_inf, flag.to(self.found_inf)))
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self._one)

    def step(self, optimizer: torch.optim.Optimizer, device_skip: bool = False) -> None:
        """Step ``optimizer`` unless the flag is raised. ``device_skip``: the optimizer's kernels skip a flagged step
        themselves (torch's fused kernels, given ``found_inf``; :func:`fastafd.optim.device_skip`), so nothing
        reads the flag on the host."""
        if self.scaler is not None:
            # make the scaler's record agree with the shared (all-stage, all-rank) decision
            for flag in self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                flag.copy_(self.found_inf.to(flag))
        if device_skip:
            optimizer.grad_scale = None
            optimizer.found_inf = self.found_inf  # the fused kernel skips the update on the device
            optimizer.step()
        elif not bool(self.found_inf):  # CPU (or non-fused): synchronous, so reading the flag is free
            optimizer.step()

    def end(self) -> None:
        """Finish an iteration: restore BatchNorm statistics if it was skipped, count, update the scale."""
        if self._buffers:
            if self.host_reads:  # synchronous: restore only when needed
                if bool(self.found_inf):
                    torch._foreach_copy_(self._flat, self._saved)
            else:  # per dtype one gather and one exact select (NaN-safe, integers too), then one copy back
                skipped = self.found_inf > 0
                for flat, saved, chosen in self._gather:
                    torch.cat(flat, out=chosen)
                    torch.where(skipped, saved, chosen, out=chosen)
                torch._foreach_copy_(self._flat, self._chosen)
        self.count += 1
        self.skipped += self.found_inf
        self.streak.copy_((self.streak + 1) * self.found_inf)
        self.longest_end.copy_(torch.where(self.streak > self.longest_streak, self.count, self.longest_end))
        torch.maximum(self.longest_streak, self.streak, out=self.longest_streak)
        if self.scaler is not None and self.scaler._per_optimizer_states:
            self.scaler.update()


    _COUNTERS = ("skipped", "streak", "longest_streak", "longest_end", "count")

    def state_dict(self) -> dict:
        out = {name: float(getattr(self, name)) for name in self._COUNTERS}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        for name in self._COUNTERS:
            getattr(self, name).fill_(state[name])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class Stage:
    """One optimizer over a fixed set of parameters, with its learning-rate schedule."""

    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler (step_update)
    guard: StepGuard = field(repr=False)
    grad_sync: GradSync = field(default_factory=LocalSync, repr=False)
    """The run's way of averaging gradients over processes (:mod:`fastafd.comm`); it makes :attr:`sync`."""
    device_skip: bool = False
    """Its optimizer skips a flagged step on the device (torch's fused kernels: :func:`fastafd.optim.device_skip`)."""
    sync: ParamSync = field(init=False, repr=False)
    """This stage's own gradient sync: its parameters' buckets and collectives."""

    def __post_init__(self) -> None:
        self.sync = self.grad_sync.for_params(self.params, self.optimizer)

    @stage_range  # trace range '<name>_step' (profiler, NVTX)
    def step(self, loss: Tensor) -> None:
        """Zero grads, backward into this stage's parameters (their all-reduce overlapped with it when the
        run overlaps), finish the sync and check the gradients, step."""
        self.guard.check(loss)
        self.sync.zero()
        torch.autograd.backward(self.guard.scale(loss), inputs=self.params)
        self._finish_grads()
        self.guard.step(self.optimizer, self.device_skip)

    @stage_range  # trace range '<name>_step' (profiler, NVTX)
    def step_with(self, grads: Sequence[Tensor | None]) -> None:
        """Step with precomputed (scaled) gradients of this stage's parameters: :meth:`set_grads` + :meth:`apply`."""
        self.set_grads(grads)
        self.guard.step(self.optimizer, self.device_skip)

    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Take precomputed (scaled) gradients of this stage's parameters, average and check them (simultaneous
        mode: the check raises the shared flag before any other stage steps); :meth:`apply` steps."""
        self.sync.take(grads)
        self._finish_grads()

    @stage_range  # trace range '<name>_step' (profiler, NVTX)
    def apply(self) -> None:
        """Step with the gradients given to :meth:`set_grads`."""
        self.guard.step(self.optimizer, self.device_skip)

    def _finish_grads(self) -> None:
        """Average the gradients and the flag over processes, then check them (unscale with fp16): every rank
        checks the same averaged values, so the skip decision is the same everywhere."""
        self.sync.reduce(self.guard.found_inf)
        self.guard.check_grads(self.optimizer)

    def set_step(self, step: int) -> None:
        """Set the learning rate for the optimizer step with index ``step`` (0-based)."""
        self.scheduler.step_update(step)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class Stages(Mapping[str, Stage]):
    """The stages of one method, by name, and the :class:`StepGuard` they share (torchtitan's
    ``OptimizersContainer``): the trainer brackets each iteration with :meth:`iteration`, sets the
    schedules with :meth:`set_step`, reads :attr:`lrs`, and checkpoints them with :meth:`state_dict`."""

    def __init__(self, stages: Mapping[str, Stage], guard: StepGuard) -> None:
        self._stages = dict(stages)
        self.guard = guard
        assert all(s.guard is guard for s in self._stages.values()), "stages of one iteration share one guard"

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """One training iteration: clear the skip flag and remember BN statistics; afterwards restore them
        if the iteration was skipped, and count."""
        self.guard.begin()
        yield
        self.guard.end()

    def set_step(self, step: int) -> None:
        """Learning rates for the optimizer step with index ``step`` (0-based), every stage."""
        for stage in self._stages.values():
            stage.set_step(step)

    @property
    def lrs(self) -> dict[str, float]:
        return {name: stage.lr for name, stage in self._stages.items()}

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """(optimizer state tensors keyed ``<stage>/<param id>/<key>``, JSON-ready rest: per-stage optimizer
        scalars and hyper-parameters, schedules, and the guard's counters and loss scale)."""
        from fastafd.checkpoint import codec

        tensors: dict[str, Tensor] = {}
        meta = {}
        for name, stage in self._stages.items():
            t, m = codec.optimizer_to_safe(stage.optimizer, name)
            tensors.update(t)
            meta[name] = {"optimizer": m, "scheduler": _jsonable(stage.scheduler.state_dict())}
        return tensors, {"stages": meta, "guard": self.guard.state_dict()}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping, *, same_schedule: bool,
                        check: Callable[[str, dict, torch.optim.Optimizer], None] | None = None) -> None:
        """Inverse of :meth:`state_dict`. Hyper-parameters stay this run's (its config); schedules are
        restored only when ``same_schedule``; ``check(stage, optimizer state dict, optimizer)`` may refuse
        state that does not fit before it is loaded."""
        from fastafd.checkpoint import codec

        for name, stage in self._stages.items():
            sd = codec.optimizer_from_safe(dict(tensors), meta["stages"][name]["optimizer"], name)
            if check is not None:
                check(name, sd, stage.optimizer)
            sd["param_groups"] = stage.optimizer.state_dict()["param_groups"]
            stage.optimizer.load_state_dict(sd)
            match_parameter_layout(stage.optimizer)
            if same_schedule:
                stage.scheduler.load_state_dict(meta["stages"][name]["scheduler"])
        self.guard.load_state_dict(meta["guard"])


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor its parameter's strides (memory format).

    Checkpoints store tensors contiguous (NCHW) and ``Optimizer.load_state_dict`` restores dtype and
    device but not layout, while channels-last parameters stay channels-last. The fused kernels need
    parameters, gradients and state with the same strides: CUDA refuses the step, CPU computes a wrong
    update (it walks both buffers in memory order).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            for key, value in (st or {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _jsonable(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
