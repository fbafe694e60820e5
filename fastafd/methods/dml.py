"""``independent`` (CE only, the vanilla baseline) and ``dml`` (Deep Mutual Learning: CE + KL to the peer)."""

from __future__ import annotations

from torch import Tensor

from fastafd.methods.base import SingleStageTask, StageSpec


class DML(SingleStageTask):
    """Logit loss only, one SGD stage over all peer parameters."""

    method = "dml"
    use_kl = True

    def stages(self) -> dict[str, StageSpec]:
        return {"logit": StageSpec(self.peer_parameters(), "optim")}

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            _, logits = self.forward_peers(x)
        return self.logit_loss(logits, y, kl=self.use_kl)


class Independent(DML):
    """Each peer trained alone with cross-entropy (the paper's "vanilla" rows)."""

    method = "independent"
    needs_pair = False
    use_kl = False
