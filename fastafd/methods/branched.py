"""The shared part of the multi-branch methods (``one``, ``cl``): one network, its trunk shared, K branches.

``--model.peers`` names the network once per branch (``cifar_resnet32 cifar_resnet32 cifar_resnet32``:
three branches; the recipes use three, the papers' default), so everything that counts peers (the
report's columns, TensorBoard's ``peer<k>`` tags, ``export --peer k``) counts branches. Branch k
with the trunk is the plain network, and that is what ``fastafd export --peer k`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from fastafd.errors import UserError
from fastafd.methods.base import Numerics, SingleStageTask, Task
from fastafd.models.branches import BranchNet
from fastafd.models.peers import create_peer

if TYPE_CHECKING:
    from fastafd.config import MethodConfig, TrainConfig


class BranchTask(SingleStageTask):
    """A :class:`BranchNet` (``net``) trained by one SGD stage; subclasses give :meth:`forward_loss`."""

    same_architecture = True
    loss_keys = ("ce", "kl")

    def __init__(self, net: BranchNet, cfg: MethodConfig, numerics: Numerics, names: list[str]) -> None:
        super().__init__([], [], cfg, numerics, names=names)
        self.net = net
        self.teacher_of = []

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        names = list(cfg.model.peers)
        if len(set(names)) != 1:
            raise UserError(f"method {cfg.method.name} branches one network, but model.peers names {', '.join(sorted(set(names)))}: "
                            f"repeat one name once per branch, e.g. --model.peers {' '.join([names[0]] * 3)}")

    @classmethod
    def build(cls, cfg: TrainConfig, num_classes: int, numerics: Numerics, device: torch.device, channels_last: bool) -> Task:
        cls.check(cfg)
        names = list(cfg.model.peers)
        bases = [create_peer(names[0], num_classes, image_size=cfg.data.image_size, drop_rate=cfg.model.drop_rate,
                             pretrained=cfg.model.pretrained) for _ in names]
        task = cls(BranchNet(bases, names[0]), cfg.method, numerics, names)
        task.to(device=device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        return task

    def compile(self, scope: Literal["regional", "whole"] = "regional", backend: str = "inductor") -> None:
        """The branches share one trunk, so there are no per-peer blocks to compile on their own: the whole forward
        + loss is the unit under either scope (regional compilation of a branched network is not built yet)."""
        super().compile("whole", backend)

    @classmethod
    def deployable_state(cls, state: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
        return BranchNet.plain_state(dict(state), k, prefix="net.")

    @property
    def k(self) -> int:
        return self.net.m

    def peer_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def forward_peers(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The trunk's output (as the one "feature map") and the branches' logits ``(K, B, classes)``."""
        h = self.net.forward_trunk(x)
        return [h], self.net.forward_branches(self.trunk_to_branches(h))

    def trunk_to_branches(self, h: Tensor) -> Tensor:
        """What the branches read of the trunk's output (CL: rescaled backward)."""
        return h
