"""Optimizer stages: the unit that turns one loss into one parameter update.

A method's iteration is a sequence of stages (AFD: logit step with SGD, then discriminator step and
feature step with Adam). Each :class:`Stage` zeroes its own gradients, back-propagates its loss into
its own parameters only (``backward(inputs=...)``: a frozen discriminator gets no gradient), averages
the gradients over processes, and steps its optimizer. Nothing here reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

GradSync = Callable[[Sequence[nn.Parameter]], None]


@dataclass
class Stage:
    """One optimizer over a fixed set of parameters, with its learning-rate schedule."""

    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler (step_update)
    scaler: torch.amp.GradScaler | None = None
    grad_sync: GradSync | None = None

    def step(self, loss: Tensor) -> None:
        """Zero grads, backward into this stage's parameters, sync gradients, step."""
        self.optimizer.zero_grad(set_to_none=True)
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        torch.autograd.backward(scaled, inputs=self.params)
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def set_step(self, step: int) -> None:
        """Set the learning rate for the optimizer step with index ``step`` (0-based)."""
        self.scheduler.step_update(step)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
