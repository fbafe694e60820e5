"""Peer networks: any timm model by name (plus the CIFAR networks registered in ``cifar.py``)."""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from fastafd.errors import UserError
from fastafd.models import cifar  # noqa: F401  (registers the CIFAR networks with timm)


def create_peer(name: str, num_classes: int, *, drop_rate: float = 0.0, pretrained: bool = False) -> nn.Module:
    """Build one peer with timm; an unknown name is a :class:`UserError` with the closest names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for valid names"
        raise UserError(f"unknown model '{name}' in model.peers: {hint}")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate)
    for attr in ("forward_features", "forward_head"):
        if not callable(getattr(model, attr, None)):
            raise UserError(f"model '{name}' has no {attr}(): choose a timm CNN with a feature map, e.g. resnet18")
    return model


@torch.no_grad()
def feature_shape(model: nn.Module, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of ``model.forward_features`` at ``image_size``, measured with one forward pass.

    The pass runs on a CPU copy-free eval forward (batch 1), so running BN statistics are untouched.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
        out = model.forward_features(x)
    finally:
        model.train(was_training)
    if out.dim() != 4:
        raise UserError(
            f"{type(model).__name__}.forward_features returns shape {tuple(out.shape)}, not a (B, C, H, W) map: "
            "choose a convolutional timm model"
        )
    return (int(out.shape[1]), int(out.shape[2]), int(out.shape[3]))


def head_parameters(model: nn.Module) -> set[int]:
    """ids of the classifier's parameters (``get_classifier()``); the rest is the feature extractor G_k."""
    return {id(p) for p in model.get_classifier().parameters()}


def feature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the feature extractor G_k: everything but the classifier."""
    head = head_parameters(model)
    return [p for p in model.parameters() if id(p) not in head]
