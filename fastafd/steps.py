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
        """Zero grads, backward into this stage's parameters, check them, sync gradients and the flag, step."""
        self.guard.check(loss)
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(self.guard.scale(loss), inputs=self.params)
        self.guard.check_grads(self.optimizer)
        self._sync_and_step()

    @stage_range  # trace range '<name>_step' (profiler, NVTX)
    def step_with(self, grads: Sequence[Tensor | None]) -> None:
        """Step with precomputed (scaled) gradients of this stage's parameters: :meth:`set_grads` + :meth:`apply`."""
        self.set_grads(grads)
        self._sync_and_step()

    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Take precomputed (scaled) gradients of this stage's parameters and check them (simultaneous
        mode: the check raises the shared flag before any other stage steps); :meth:`apply` steps."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.guard.check_grads(self.optimizer)

    @stage_range  # trace range '<name>_step' (profiler, NVTX)
    def apply(self) -> None:
        """Step with the gradients given to :meth:`set_grads`."""
        self._sync_and_step()

    def _sync_and_step(self) -> None:
        """Sync the gradients and the flag over processes, and step."""
        if self.grad_sync is not None:
            self.grad_sync(self.params, self.guard.found_inf)
        self.guard.step(self.optimizer)

    def set_step(self, step: int) -> None:
        """Set the learning rate for the optimizer step with index ``step`` (0-based)."""
        self.scheduler.step_update(step)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
