"""The feature-map discriminators of AFD (architecture ours, see AFD.md).

:class:`Discriminator` is one D_k, written plainly. :class:`DiscriminatorBank` holds all K of them
as one module whose forward is one set of kernels: the K maps are concatenated along channels and
each layer is a grouped convolution (groups = K), so group k sees only map k and its own weights.
BatchNorm normalises each channel over the batch, so per-channel statistics of the concatenated
input are exactly those of K separate discriminators; the last linear layer is a batched
per-group dot product. The bank is numerically the same function as K separate discriminators
(tested), at the cost of one kernel launch per layer instead of K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _widths(channels: int) -> tuple[int, int]:
    return max(channels // 2, 1), max(channels // 4, 1)


class Discriminator(nn.Module):
    """Conv3x3(C->C/2) + BN + LeakyReLU(0.2), Conv3x3(C/2->C/4, stride 2) + BN + LeakyReLU(0.2),
    global average pool, Linear(C/4->1), sigmoid. Maps ``(B, C, H, W)`` feature maps to ``(B,)`` in [0, 1].
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c2, c4 = _widths(channels)
        self.body = nn.Sequential(
            nn.Conv2d(channels, c2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c2, c4, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c4, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).squeeze(-1).sigmoid()


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

    @torch.no_grad()
    def load_discriminators(self, discs: list[Discriminator]) -> None:
        """Copy K separate discriminators' parameters and buffers into the bank."""
        for name in ("conv1", "bn1", "conv2", "bn2"):
            idx = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4}[name]
            mine = getattr(self, name)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mine, attr, None) is None:
                    continue
                getattr(mine, attr).copy_(torch.cat([getattr(d.body[idx], attr) for d in discs]))
            if isinstance(mine, nn.BatchNorm2d):
                mine.num_batches_tracked.copy_(discs[0].body[idx].num_batches_tracked)
        self.fc_weight.copy_(torch.cat([d.body[8].weight for d in discs]))
        self.fc_bias.copy_(torch.cat([d.body[8].bias for d in discs]))

    @torch.no_grad()
    def export(self, i: int) -> Discriminator:
        """Discriminator ``i`` as a separate :class:`Discriminator` (a copy)."""
        c = self.conv1.in_channels // self.k
        d = Discriminator(c).to(self.fc_weight.device)
        c2, c4 = _widths(c)
        d.body[0].weight.copy_(self.conv1.weight[i * c2 : (i + 1) * c2])
        d.body[3].weight.copy_(self.conv2.weight[i * c4 : (i + 1) * c4])
        for idx, bn, n in ((1, self.bn1, c2), (4, self.bn2, c4)):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(d.body[idx], attr).copy_(getattr(bn, attr)[i * n : (i + 1) * n])
            d.body[idx].num_batches_tracked.copy_(bn.num_batches_tracked)
        d.body[8].weight.copy_(self.fc_weight[i : i + 1])
        d.body[8].bias.copy_(self.fc_bias[i : i + 1])
        return d
