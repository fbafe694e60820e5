"""The methods: one task module each (``dml.py``: independent and dml; ``kdcl.py``; ``align.py``: l1 and l2;
``afd.py``; ``afd_shared.py``), registered in :mod:`fastafd.methods.registry`; :func:`validate` checks a config's
method; :func:`build_task` makes the task of a config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastafd.methods import registry
from fastafd.methods.base import Numerics, StageSpec, Task
from fastafd.methods.registry import validate
from fastafd.models.peers import create_peer, feature_shape

if TYPE_CHECKING:
    from fastafd.config import TrainConfig

__all__ = ["Numerics", "StageSpec", "Task", "build_task", "registry", "validate"]


def build_task(cfg: TrainConfig, num_classes: int, numerics: Numerics, device: torch.device, channels_last: bool) -> Task:
    """Create the K peers (seeded by the caller), measure their feature maps, and wrap them in the method's task
    (uncompiled: the caller calls :meth:`Task.compile` when the run compiles)."""
    validate(cfg)
    size = cfg.data.image_size
    peers = [create_peer(name, num_classes, image_size=size, drop_rate=cfg.model.drop_rate, pretrained=cfg.model.pretrained)
             for name in cfg.model.peers]
    shapes = [feature_shape(p, size, name) for p, name in zip(peers, cfg.model.peers, strict=True)]
    task = registry.get(cfg.method.name)(peers, shapes, cfg.method, numerics, names=list(cfg.model.peers))
    task.to(device=device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return task
