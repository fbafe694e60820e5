"""The methods: one task module each (``dml.py``: independent and dml; ``kdcl.py``; ``align.py``: l1 and l2;
``afd.py``, ``afd_shared.py``; ``one.py`` and ``cl.py``: the multi-branch methods on ``branched.py``), registered in
:mod:`fastafd.methods.registry`; :func:`validate` checks a config's method; :func:`build_task` makes the task of a config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastafd.methods import registry
from fastafd.methods.base import Numerics, StageSpec, Task
from fastafd.methods.registry import validate

if TYPE_CHECKING:
    from fastafd.config import TrainConfig

__all__ = ["Numerics", "StageSpec", "Task", "build_task", "registry", "validate"]


def build_task(cfg: TrainConfig, num_classes: int, numerics: Numerics, device: torch.device, channels_last: bool) -> Task:
    """The task of ``cfg`` through its method's :meth:`Task.build` (the construction seam; seeded by the caller,
    uncompiled: the caller calls :meth:`Task.compile` when the run compiles)."""
    validate(cfg)
    return registry.get(cfg.method.name).build(cfg, num_classes, numerics, device, channels_last)
