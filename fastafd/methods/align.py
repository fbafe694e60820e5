"""``l1`` / ``l2``: the logit loss plus direct feature-map alignment ``|T_k(F_k) - stopgrad(T_j(F_j))|^p``
(j: peer k's teachers of ``method.k_scheme``, averaged).

The baseline the paper compares AFD with. One SGD stage trains the peers and the transfer layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastafd import losses
from fastafd.methods.base import SingleStageTask
from fastafd.methods.registry import register
from fastafd.models.transfer import common_shape, make_transfer


@register
class Align(SingleStageTask):
    method = "l1"
    summary = "logit loss + mean absolute distance of the transfer-mapped feature maps to the teacher's (baseline)"
    loss_keys = ("ce", "kl", "align")
    fused_units = ("align_loss",)
    p = 1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        target = common_shape(self.shapes)
        self.transfers = nn.ModuleList(make_transfer(s, target) for s in self.shapes)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.transfers.parameters())

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            feats, logits = self.forward_peers(x)
        return self.align_loss(feats, logits, y)

    def align_loss(self, feats: list[Tensor], logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The transfer layers, the logit loss and the alignment term (the fused unit of the regional scope)."""
        with self.numerics.autocast():
            mapped = [t(f) for t, f in zip(self.transfers, feats, strict=True)]
        total, metrics = self.logit_loss(logits, y)
        align = torch.stack([sum(losses.feature_alignment(mapped[k], mapped[j], self.p) for j in teachers) / len(teachers)
                             for k, teachers in enumerate(self.distil_teachers)])
        metrics["align"] = align.detach()
        return total + self.cfg.feature_weight * align.sum(), metrics


@register
class AlignL2(Align):
    method = "l2"
    summary = "logit loss + mean squared distance of the transfer-mapped feature maps to the teacher's (baseline)"
    p = 2
