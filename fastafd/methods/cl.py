"""``cl``: Collaborative Learning with ILR sharing (Song and Chai, NeurIPS 2018).

One network, its low-level layers shared, its last stage duplicated into K heads
(:mod:`fastafd.methods.branched`), no gate. Head h learns from the other heads' consensus: its loss
is ``beta * CE(z_h, y) + (1 - beta) * T^2 KL(q_-h || softmax(z_h / T))`` with ``q_-h = softmax(mean of
the other heads' logits / T)``, detached (the paper's ``T = 2``, ``beta = 0.5``; the recipes set
T = 2). Backpropagation rescaling: the trunk's output enters the heads through an identity whose
backward divides the gradient by K, so the trunk receives the mean of the heads' gradients, not
their sum. One SGD stage; the evaluation's ensemble is the mean of the heads' probabilities.
"""

from __future__ import annotations

from torch import Tensor

from fastafd import losses
from fastafd.methods.branched import BranchTask
from fastafd.methods.registry import register
from fastafd.models.branches import scale_grad


def others_mean(logits: Tensor) -> Tensor:
    """Per head, the mean of the other heads' logits: ``(K, B, C)`` -> ``(K, B, C)``."""
    k = logits.shape[0]
    return (logits.sum(dim=0, keepdim=True) - logits) / (k - 1)


@register
class CL(BranchTask):
    method = "cl"
    summary = ("Collaborative Learning: K heads of one network on a shared trunk (gradient rescaled 1/K); "
               "beta CE + (1 - beta) T^2 KL to the other heads' mean")
    loss_keys = ("ce", "kl")
    recipe_defaults = {"temperature": 2.0}

    def trunk_to_branches(self, h: Tensor) -> Tensor:
        return scale_grad(h, 1.0 / self.k)

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            _, logits = self.forward_peers(x)
        ce = losses.cross_entropy(logits, y)
        kl = losses.kl_to_targets(logits, others_mean(logits.detach()), self.cfg.temperature)
        beta = self.cfg.beta
        total = beta * ce.sum() + (1.0 - beta) * kl.sum()
        return total, {"ce": ce.detach(), "kl": kl.detach()}
