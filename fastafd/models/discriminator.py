"""The feature-map discriminators of AFD (architecture ours, see docs/method.md).

:class:`DiscriminatorBank` holds all K discriminators D_k (each: Conv3x3 C->C/2 + BN + LeakyReLU(0.2),
Conv3x3 C/2->C/4 stride 2 + BN + LeakyReLU(0.2), global average pool, Linear C/4->1, sigmoid) as one
module whose forward is one set of kernels: the K maps are concatenated along channels and
each layer is a grouped convolution (groups = K), so group k sees only map k and its own weights.
BatchNorm normalises each channel over the batch, so per-channel statistics of the concatenated
input are exactly those of K separate discriminators; the last linear layer is a batched
per-group dot product. The bank is numerically the same function as K separate discriminators
(tested against the plain per-peer discriminator of :mod:`fastafd.bench.reference`), at the cost of
one kernel launch per layer instead of K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _widths(channels: int) -> tuple[int, int]:
    return max(channels // 2, 1), max(channels // 4, 1)


class DiscriminatorBank(nn.Module):
    """K discriminators evaluated together: K ``(B, C, H, W)`` maps -> ``(K, B)`` outputs, D_k on map k."""

    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        c2, c4 = _widths(channels)
        self.k, self.c4 = k, c4
        self.conv1 = nn.Conv2d(k * channels, k * c2, 3, stride=1, padding=1, groups=k, bias=False)
        self.bn1 = nn.BatchNorm2d(k * c2)
        self.conv2 = nn.Conv2d(k * c2, k * c4, 3, stride=2, padding=1, groups=k, bias=False)
        self.bn2 = nn.BatchNorm2d(k * c4)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.fc_weight = nn.Parameter(torch.empty(k, c4))
        self.fc_bias = nn.Parameter(torch.empty(k))
        bound = 1.0 / math.sqrt(c4)  # nn.Linear's default initialisation, per discriminator
        nn.init.uniform_(self.fc_weight, -bound, bound)
        nn.init.uniform_(self.fc_bias, -bound, bound)

    def forward(self, maps: Sequence[Tensor] | Tensor) -> Tensor:
        """K maps of shape ``(B, C, H, W)`` (a list, or stacked as ``(K, B, C, H, W)``) -> ``(K, B)``.

        The grouped convolution's input is the maps concatenated along channels: one copy, in the
        maps' own memory format (channels-last maps stay channels-last).
        """
        x = torch.cat(tuple(maps), dim=1)
        b = x.shape[0]
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        pooled = x.mean(dim=(2, 3)).reshape(b, self.k, self.c4)
        logits = (pooled * self.fc_weight).sum(dim=-1) + self.fc_bias  # (B, K)
        return logits.t().sigmoid()
