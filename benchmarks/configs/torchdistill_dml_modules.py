"""Modules that benchmarks/configs/torchdistill_dml.yaml names, registered with torchdistill's registries.

torchdistill documents this as the way to bring one's own modules: a registry decorator in a module
that the config lists under ``dependencies`` (imported by ``torchdistill.common.main_util.import_dependencies``).

* ``timm_model``: the peers, built by timm exactly as fastafd builds them (torchdistill's own model
  registry has torchvision's and its CIFAR networks; timm through ``torch.hub`` would need the network).
* ``MutualKLLoss``: the KL term of Deep Mutual Learning for one of the two peers,
  ``T^2 KL(softmax(z_other / T) || softmax(z_learner / T))`` averaged over the batch, the other peer's
  logits detached: fastafd's ``kl_to_teacher`` for K = 2. torchdistill's ``KDLoss`` is the student's
  term only, and it does not detach the teacher, so with a trainable teacher its gradient would also
  pull the teacher toward the student through the student's own term.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchdistill.losses.registry import register_mid_level_loss
from torchdistill.models.registry import register_model


@register_model(key="timm_model")
def timm_model(model_name: str, **kwargs) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)``."""
    return timm.create_model(model_name, **kwargs)


@register_mid_level_loss
class MutualKLLoss(nn.Module):
    """One peer's DML term: KL from the other peer's softened distribution (detached) to its own."""

    def __init__(self, learner: str, temperature: float, **kwargs):
        super().__init__()
        if learner not in ("student", "teacher"):
            raise ValueError(f"learner must be 'student' or 'teacher', not {learner!r}")
        self.learner = learner
        self.temperature = temperature

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets=None, *args, **kwargs) -> torch.Tensor:
        student, teacher = student_io_dict["."]["output"], teacher_io_dict["."]["output"]
        own, other = (student, teacher) if self.learner == "student" else (teacher, student)
        t = self.temperature
        log_p = F.log_softmax(own / t, dim=1)
        log_q = F.log_softmax(other.detach() / t, dim=1)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)
