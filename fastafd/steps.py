"""Optimizer stages: the unit that turns one loss into one parameter update.

A method's iteration is a sequence of stages (AFD: logit step with SGD, then discriminator step and
feature step with Adam). Each :class:`Stage` zeroes its own gradients, back-propagates its loss into
its own parameters only (``backward(inputs=...)``: a frozen discriminator gets no gradient), averages
the gradients over processes, and steps its optimizer.

All stages of an iteration share one :class:`StepGuard`: a non-finite loss (or, with fp16, a
non-finite gradient) on any rank sets one device-side flag, and every later optimizer step of the
iteration is skipped on every rank, BatchNorm statistics included. On CUDA the skip happens inside
torch's fused optimizer kernels (``found_inf``), so the hot path never reads a value back to the
host. On CPU execution is synchronous anyway, so the flag is read directly (no pipeline to stall).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastafd.observe import stage_range

GradSync = Callable[[Sequence[nn.Parameter], Tensor], None]
"""``grad_sync(params, found_inf)``: average the gradients over processes and OR the flag."""


class StepGuard:
    """Per-iteration non-finite detection shared by all stages and ranks, and the fp16 loss scale."""

    def __init__(self, device: torch.device, *, fp16: bool = False, buffers: Sequence[Tensor] = ()) -> None:
        self.device = device
        self.found_inf = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        """Skipped iterations since the start (a device tensor; read it at log time)."""
        self.streak = torch.zeros((), device=device)
        """Current run of consecutive skipped iterations."""
        self.longest_streak = torch.zeros((), device=device)
        self.longest_end = torch.zeros((), device=device)
        """Iteration count (= global step, 1-based) at which the longest streak last grew."""
        self.count = torch.zeros((), device=device)
        """Iterations finished (kept on the device so that no step number crosses to it per step)."""
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        self._buffers = list(buffers)
        self._saved = [torch.empty_like(b) for b in self._buffers]

    def begin(self) -> None:
        """Start an iteration: clear the flag, remember the BatchNorm statistics."""
        self.found_inf.zero_()
        if self._buffers:
            torch._foreach_copy_(self._saved, self._buffers)

    def check(self, loss: Tensor) -> None:
        """Raise the flag if ``loss`` is NaN or infinite (device-side)."""
        self.found_inf.copy_(torch.maximum(self.found_inf, (~torch.isfinite(loss.detach())).to(self.found_inf.dtype)))

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """fp16: unscale the gradients in place and merge their non-finite check into the flag."""
        if self.scaler is None:
            return
        self.scaler.unscale_(optimizer)
        state = self.scaler._per_optimizer_states[id(optimizer)]  # torch keeps the per-device flags here
        for flag in state["found_inf_per_device"].values():
            self.found_inf.copy_(torch.maximum(self.found_inf, flag.to(self.found_inf)))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` unless the flag is raised."""
        if self.scaler is not None:
            # make the scaler's record agree with the shared (all-stage, all-rank) decision
            for flag in self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                flag.copy_(self.found_inf.to(flag))
        if getattr(optimizer, "_fastafd_device_skip", False):
            optimizer.grad_scale = None
            optimizer.found_inf = self.found_inf  # the fused kernel skips the update on the device
            optimizer.step()
        elif not bool(self.found_inf):  # CPU (or non-fused): synchronous, so reading the flag is free
            optimizer.step()

    def end(self) -> None:
        """Finish an iteration: restore BatchNorm statistics if it was skipped, count, update the scale."""
        if self._buffers:
            if self.device.type == "cpu":  # synchronous: restore only when needed
                if bool(self.found_inf):
                    torch._foreach_copy_(self._buffers, self._saved)
            else:
                keep = self.found_inf > 0
                for buf, saved in zip(self._buffers, self._saved, strict=True):
                    buf.copy_(torch.where(keep, saved, buf))
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
    grad_sync: GradSync | None = None

    @stage_range  # trace range '<name>_step' (profiler, NVTX)
    def step(self, loss: Tensor) -> None:
        """Zero grads, backward into this stage's parameters, sync gradients and the flag, step."""
        self.guard.check(loss)
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(self.guard.scale(loss), inputs=self.params)
        self.apply()

    @stage_range  # trace range '<name>_step' (profiler, NVTX)
    def step_with(self, grads: Sequence[Tensor | None]) -> None:
        """Step with precomputed (scaled) gradients of this stage's parameters (simultaneous mode)."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.apply()

    def apply(self) -> None:
        """Unscale (fp16), sync over processes, and step: the second half of :meth:`step`."""
        self.guard.unscale(self.optimizer)
        if self.grad_sync is not None:
            self.grad_sync(self.params, self.guard.found_inf)
        self.guard.step(self.optimizer)

    def set_step(self, step: int) -> None:
        """Set the learning rate for the optimizer step with index ``step`` (0-based)."""
        self.scheduler.step_update(step)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
