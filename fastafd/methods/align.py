"""``l1`` / ``l2``: the logit loss plus direct feature-map alignment ``|T_k(F_k) - stopgrad(T_j(F_j))|^p``.

The baseline the paper compares AFD with. One SGD stage trains the peers and the transfer layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastafd import losses
from fastafd.methods.base import StageSpec, Task
from fastafd.models.transfer import common_shape, make_transfer
from fastafd.steps import Stage


class Align(Task):
    method = "l1"
    p = 1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        target = common_shape(self.shapes)
        self.transfers = nn.ModuleList(make_transfer(s, target) for s in self.shapes)
        self._forward_loss = self.compiled(self.forward_loss)

    def stages(self) -> dict[str, StageSpec]:
        return {"logit": StageSpec(self.peer_parameters() + list(self.transfers.parameters()), "optim")}

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            feats, logits = self.forward_peers(x)
            mapped = [t(f) for t, f in zip(self.transfers, feats, strict=True)]
        total, metrics = self.logit_loss(logits, y)
        align = torch.stack([losses.feature_alignment(mapped[k], mapped[j], self.p) for k, j in enumerate(self.teacher_of)])
        metrics["align"] = align.detach()
        return total + self.cfg.feature_weight * align.sum(), metrics

    def train_step(self, x: Tensor, y: Tensor, stages: Mapping[str, Stage]) -> dict[str, Tensor]:
        loss, metrics = self._forward_loss(x, y)
        stages["logit"].step(loss)
        return metrics


class AlignL2(Align):
    method = "l2"
    p = 2
