"""``one``: On-the-fly Native Ensemble (Lan, Zhu, Gong, NeurIPS 2018).

One network, its low-level layers shared, its last stage duplicated into K branches
(:mod:`fastafd.methods.branched`). A gate reads the trunk's features and weighs the branches per
sample (``g``, summing to 1); the weighted sum of their logits ``z_e = sum_i g_i z_i`` is the
on-the-fly teacher. Loss: ``sum_i CE(z_i, y) + CE(z_e, y) + kl_weight * T^2 sum_i KL(softmax(z_e/T) ||
softmax(z_i/T))``, the teacher detached in the KL (the paper's ``T = 3``). One SGD stage over the
network and the gate. The ensemble of the evaluation is ``z_e``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from fastafd import losses
from fastafd.methods.branched import BranchTask
from fastafd.methods.registry import register
from fastafd.models.branches import BranchNet, Gate

if TYPE_CHECKING:
    from fastafd.config import MethodConfig
    from fastafd.methods.base import Numerics


def gated_logits(gate: Tensor, logits: Tensor) -> Tensor:
    """``sum_i g_i z_i``: ``(B, K)`` weights and ``(K, B, C)`` logits -> ``(B, C)``."""
    return (gate.t().unsqueeze(-1).to(logits.dtype) * logits).sum(dim=0)


@register
class ONE(BranchTask):
    method = "one"
    summary = "ONE: K branches of one network on a shared trunk; CE per branch + CE and T^2 KL from their gated ensemble"
    loss_keys = ("ce", "kl")

    def __init__(self, net: BranchNet, cfg: MethodConfig, numerics: Numerics, names: list[str]) -> None:
        super().__init__(net, cfg, numerics, names)
        self.gate = Gate(net.trunk_channels, net.m)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters())

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            feats, logits = self.forward_peers(x)
            teacher = gated_logits(self.gate(feats[0]), logits)
        ce = losses.cross_entropy(logits, y)
        ce_teacher = losses.cross_entropy(teacher.unsqueeze(0), y)
        kl = losses.kl_to_targets(logits, teacher.unsqueeze(0), self.cfg.temperature)
        total = ce.sum() + ce_teacher.sum() + self.cfg.kl_weight * kl.sum()
        return total, {"ce": ce.detach(), "kl": kl.detach()}

    def ensemble(self, feats: list[Tensor], logits: Tensor) -> Tensor:
        return gated_logits(self.gate(feats[0]), logits).float()
