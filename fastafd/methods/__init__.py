"""Method registry: a plain dict from method name to task class."""

from __future__ import annotations

import torch

from fastafd.config import TrainConfig
from fastafd.errors import UserError
from fastafd.methods.afd import AFD
from fastafd.methods.align import Align, AlignL2
from fastafd.methods.base import Numerics, StageSpec, Task
from fastafd.methods.dml import DML, Independent
from fastafd.models.peers import create_peer, feature_shape

METHODS: dict[str, type[Task]] = {cls.method: cls for cls in (Independent, DML, Align, AlignL2, AFD)}

__all__ = ["METHODS", "Numerics", "StageSpec", "Task", "build_task"]


def build_task(cfg: TrainConfig, num_classes: int, numerics: Numerics, device: torch.device, channels_last: bool) -> Task:
    """Create the K peers (seeded by the caller), measure their feature maps, and wrap them in the method's task."""
    peers = [
        create_peer(name, num_classes, drop_rate=cfg.model.drop_rate, pretrained=cfg.model.pretrained) for name in cfg.model.peers
    ]
    shapes = [feature_shape(p, cfg.data.image_size) for p in peers]
    cls = METHODS[cfg.method.name]
    if cls.needs_pair and len(peers) < 2:
        raise UserError(f"method {cfg.method.name} needs K >= 2 peers: give two or more names to --model.peers")
    task = cls(peers, shapes, cfg.method, numerics, names=list(cfg.model.peers))
    task.to(device=device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return task
