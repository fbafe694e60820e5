"""``independent`` (CE only, the vanilla baseline) and ``dml`` (Deep Mutual Learning: CE + KL to the peer)."""

from __future__ import annotations

from torch import Tensor

from fastafd.methods.base import SingleStageTask
from fastafd.methods.registry import register


@register
class Independent(SingleStageTask):
    """Each peer trained alone with cross-entropy (the paper's "vanilla" rows)."""

    method = "independent"
    summary = "each peer alone with cross-entropy (the vanilla baseline)"
    needs_pair = False
    use_kl = False

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            _, logits = self.forward_peers(x)
        return self.logit_loss(logits, y, kl=self.use_kl)


@register
class DML(Independent):
    """Logit loss only, one SGD stage over all peer parameters (Zhang et al., CVPR 2018)."""

    method = "dml"
    summary = "Deep Mutual Learning: cross-entropy + T^2 KL to the teacher peer (the logit loss alone)"
    needs_pair = True
    use_kl = True
    loss_keys = ("ce", "kl")
