"""``kdcl``: collaborative learning with an ensemble soft target (KDCL-MinLogit, Guo et al., CVPR 2020).

Every peer learns from one teacher built from all peers' logits at once instead of from one peer:
for each sample, each peer's logits are shifted so that the true class scores 0 (``z - z_y``), and
the teacher takes, per class, the minimum over the peers. The true class keeps 0 and every other
class gets the lowest score any peer gives it relative to the true class: the ensemble's most
confident correct prediction, with no parameters to fit. The loss per peer is the logit loss with
that target: ``CE(y, z_k) + T^2 KL(softmax(t / T) || softmax(z_k / T))``, the teacher detached.
One SGD stage, as for ``dml``: a logit-only online method in one file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastafd import losses
from fastafd.methods.base import SingleStageTask
from fastafd.methods.registry import register


def min_logit_target(logits: Tensor, y: Tensor) -> Tensor:
    """KDCL-MinLogit's teacher logits: ``min_k (z_k - z_k[y])`` per class; ``(K, B, C)``, ``(B,)`` -> ``(1, B, C)``."""
    true = logits.gather(-1, y.view(1, -1, 1).expand(logits.shape[0], -1, 1))
    return (logits - true).amin(dim=0, keepdim=True)


@register
class KDCL(SingleStageTask):
    method = "kdcl"
    summary = "KDCL-MinLogit: cross-entropy + T^2 KL to one ensemble soft target built from all peers' logits"
    loss_keys = ("ce", "kl")
    fused_units = ("kdcl_loss",)

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            _, logits = self.forward_peers(x)
        return self.kdcl_loss(logits, y)

    def kdcl_loss(self, logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``sum_k CE(y, z_k) + kl_weight * T^2 KL(min-logit target || z_k)`` and the per-peer terms."""
        ce = losses.cross_entropy(logits, y)
        wide = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the target in float32
        kl = losses.kl_to_targets(logits, min_logit_target(wide, y), self.cfg.temperature)
        total = ce.sum() + self.cfg.kl_weight * kl.sum()
        return total, {"ce": ce.detach(), "kl": kl.detach()}
