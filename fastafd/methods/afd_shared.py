"""``afd_shared``: AFD's losses stepped by one shared optimizer (the ablation of claim 3, docs/method.md).

The paper optimizes the logit loss and the feature-map loss separately, because the adversarial loss
needs a much smaller learning rate: "with one optimizer and one learning rate training fails". This
method is that alternative, so that the claim can be measured: the generator loss
``sum_k (1 - D_k(T_k(F_k)))^2`` is added to the logit loss and both are stepped by the one SGD ``optim``
stage at its learning rate, over every peer parameter and the transfer layers. The discriminators
keep their own Adam stage (``adv_optim``), exactly as in afd: only the generator side shares.

One iteration (one forward pass of the peers, as afd's simultaneous order):

1. forward every peer: logits, and the feature maps mapped by the transfer layers;
2. **discriminator step** (Adam): ``sum_k (1 - D_k(T_j(F_j)))^2 + D_k(T_k(F_k))^2`` on the detached maps;
3. **shared step** (SGD): logit loss + ``feature_weight`` x generator loss through the updated, frozen
   discriminators; it moves the peers and the transfer layers, never a discriminator.

``method.order`` does not apply (there is no second feature-map stage to order).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fastafd.methods.afd import AFD
from fastafd.methods.base import StageSpec
from fastafd.methods.registry import register
from fastafd.steps import Stage


@register
class AFDShared(AFD):
    method = "afd_shared"
    summary = ("ablation of afd: its losses, but the generator loss is added to the logit loss and stepped by the one SGD "
               "stage (optim); the discriminators keep their Adam stage")
    compile_units = ("forward_all", "disc_loss", "gen_loss")

    def stages(self) -> dict[str, StageSpec]:
        return {
            "shared": StageSpec(self.peer_parameters() + list(self.transfers.parameters()), "optim"),
            "disc": StageSpec(list(self.discriminators.parameters()), "adv_optim"),
        }

    def train_step(self, x: Tensor, y: Tensor, stages: Mapping[str, Stage]) -> dict[str, Tensor]:
        logit_loss, metrics, mapped = self.forward_all(x, y)
        d_loss, d_metrics = self.disc_loss(mapped)
        stages["disc"].step(d_loss)
        g_loss, g_metrics = self.gen_loss(mapped)  # gen_loss applies feature_weight
        stages["shared"].step(logit_loss + g_loss)
        return metrics | d_metrics | g_metrics
