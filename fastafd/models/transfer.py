"""Transfer layers T_k that make the feature maps of different architectures comparable (docs/method.md)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

Shape = tuple[int, int, int]  # (C, H, W) of one feature map


def common_shape(shapes: Sequence[Shape]) -> Shape:
    """The shape all peers' maps are brought to: the largest channel count and the smallest spatial size.

    For K = 2 this is docs/method.md's rule ("the larger of the two", "the smaller spatial size"); for K > 2
    the same rule over all peers (ours), so each network has one transfer layer shared by the
    discriminator that judges it and the one it teaches.
    """
    return (max(s[0] for s in shapes), min(s[1] for s in shapes), min(s[2] for s in shapes))


def make_transfer(shape: Shape, target: Shape) -> nn.Module:
    """Identity when ``shape == target``; otherwise 1x1 conv + BN + ReLU to the target channels,
    then adaptive average pooling to the target spatial size (when it differs)."""
    if tuple(shape) == tuple(target):
        return nn.Identity()
    c, h, w = shape
    tc, th, tw = target
    layers: list[nn.Module] = [nn.Conv2d(c, tc, 1, bias=False), nn.BatchNorm2d(tc), nn.ReLU(inplace=True)]
    if (h, w) != (th, tw):
        layers.append(nn.AdaptiveAvgPool2d((th, tw)))
    return nn.Sequential(*layers)
