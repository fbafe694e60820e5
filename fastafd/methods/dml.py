"""``independent`` (CE only, the vanilla baseline) and ``dml`` (Deep Mutual Learning: CE + KL to the peer)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fastafd.methods.base import StageSpec, Task
from fastafd.steps import Stage


class DML(Task):
    """Logit loss only, one SGD stage over all peer parameters."""

    method = "dml"
    use_kl = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._forward_loss = self.compiled(self.forward_loss)

    def stages(self) -> dict[str, StageSpec]:
        return {"logit": StageSpec(self.peer_parameters(), "optim")}

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            _, logits = self.forward_peers(x)
        return self.logit_loss(logits, y, kl=self.use_kl)

    def train_step(self, x: Tensor, y: Tensor, stages: Mapping[str, Stage]) -> dict[str, Tensor]:
        loss, metrics = self._forward_loss(x, y)
        stages["logit"].step(loss)
        return metrics


class Independent(DML):
    """Each peer trained alone with cross-entropy (the paper's "vanilla" rows)."""

    method = "independent"
    needs_pair = False
    use_kl = False
