"""Multi-branch networks for ONE and CL: one network's low-level layers shared, its last stage duplicated.

:class:`BranchNet` splits a network built by :func:`fastafd.models.peers.create_peer` at its last
stage: the **trunk** (stem and every stage but the last) is computed once, and ``m`` **branches**,
each a copy of the last stage with what follows it (WRN: its final norm and activation) and its own
pooling and classifier, read the trunk's output. Branch ``k`` together with the trunk is exactly the
plain network: :meth:`BranchNet.plain_state` gives its state dict under the plain network's own key
names (``trunk.layer1.0.conv1.weight`` -> ``layer1.0.conv1.weight``, ``branches.k.fc.weight`` ->
``fc.weight``), so it loads into ``timm.create_model(name)`` unchanged.

Only networks whose feature extractor is a plain sequence of named children can be split this way;
:data:`SPLITS` names them (the CIFAR ResNets and WRNs, timm's ResNet family). Any other model is a
one-line :class:`~fastafd.errors.UserError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet
from torch import Tensor, nn

from fastafd.errors import UserError
from fastafd.models.cifar import CifarResNet, WideResNet

SPLITS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {
    CifarResNet: (("conv1", "bn1", "act1", "layer1", "layer2"), ("layer3",)),
    WideResNet: (("conv1", "layer1", "layer2"), ("layer3", "norm", "act")),
    ResNet: (("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"), ("layer4",)),
}
"""Per network class: the trunk's children and the last stage's (each applied in this order, as the
class's ``forward_features`` does); every branch then ends in the network's ``global_pool``, dropout
(``drop_rate``) and ``fc``, as its ``forward_head`` does."""

HEAD = ("global_pool", "fc")

SPLITTABLE = "cifar_resnet8..110, cifar_wrn*, timm's resnet* (e.g. resnet18, resnet50)"
"""For the refusal's hint."""


def split_of(model: nn.Module, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (trunk, last stage) children of ``model``; a model that cannot be split is a one-line UserError."""
    for cls, split in SPLITS.items():
        if type(model) is cls:
            return split
    raise UserError(f"model '{name}' cannot be split into a shared trunk and branches (ONE/CL duplicate the last stage of a "
                    f"network whose stages run in sequence): choose one of {SPLITTABLE}")


class GradScale(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (CL's backpropagation rescaling)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: ANN001
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` in forward; the gradient flowing back through it times ``scale``."""
    return GradScale.apply(x, scale)


class BranchNet(nn.Module):
    """A shared trunk and ``m`` branches (last stage + pooling + classifier) of one network."""

    def __init__(self, bases: list[nn.Module], name: str = "") -> None:
        """``bases``: m networks of one architecture, freshly built; the trunk is the first one's, branch k
        is network k's last stage and head (so each branch starts as that network would)."""
        super().__init__()
        splits = {split_of(b, name or type(b).__name__) for b in bases}
        if len(splits) != 1 or len({type(b) for b in bases}) != 1:
            raise UserError(f"ONE/CL branch one network: the {len(bases)} networks must be of one architecture")
        trunk, stage = splits.pop()
        base = bases[0]
        self.m = len(bases)
        self.drop_rate = float(getattr(base, "drop_rate", 0.0) or 0.0)
        self.trunk = nn.ModuleDict({n: getattr(base, n) for n in trunk})
        self.branches = nn.ModuleList([nn.ModuleDict({n: getattr(b, n) for n in stage + HEAD}) for b in bases])
        self.trunk_channels = int(base.feature_info[-2]["num_chs"])
        self.num_classes = int(base.num_classes)

    def forward_trunk(self, x: Tensor) -> Tensor:
        for module in self.trunk.values():
            x = module(x)
        return x

    def forward_branch(self, k: int, h: Tensor) -> Tensor:
        """Logits of branch ``k`` from the trunk's output ``h``."""
        modules = list(self.branches[k].values())
        for module in modules[:-2]:
            h = module(h)
        h = modules[-2](h)  # global_pool
        if self.drop_rate:
            h = F.dropout(h, p=self.drop_rate, training=self.training)
        return modules[-1](h)

    def forward_branches(self, h: Tensor) -> Tensor:
        """All branches' logits stacked as ``(m, B, classes)``."""
        return torch.stack([self.forward_branch(k, h) for k in range(self.m)])

    @staticmethod
    def plain_state(state: dict[str, Tensor], k: int, prefix: str = "") -> dict[str, Tensor]:
        """Branch ``k`` + trunk from a state dict of this module (keys under ``prefix``), under the plain network's names."""
        out = {}
        for part in (f"{prefix}trunk.", f"{prefix}branches.{k}."):
            out.update({key[len(part):]: v for key, v in state.items() if key.startswith(part)})
        return out


class Gate(nn.Module):
    """ONE's gate: global average pooling of the trunk's features, a linear layer to ``m`` outputs,
    BatchNorm, ReLU, softmax: per-sample branch weights ``(B, m)`` that sum to 1."""

    def __init__(self, channels: int, m: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, m)
        self.bn = nn.BatchNorm1d(m)

    def forward(self, h: Tensor) -> Tensor:
        pooled = h.mean(dim=(2, 3))
        return F.relu(self.bn(self.fc(pooled))).softmax(dim=-1)
