"""The per-peer feature-map discriminator of AFD (architecture ours, see AFD.md)."""

from __future__ import annotations

from torch import Tensor, nn


class Discriminator(nn.Module):
    """Conv3x3(C->C/2) + BN + LeakyReLU(0.2), Conv3x3(C/2->C/4, stride 2) + BN + LeakyReLU(0.2),
    global average pool, Linear(C/4->1), sigmoid. Maps ``(B, C, H, W)`` feature maps to ``(B,)`` in [0, 1].
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c2, c4 = max(channels // 2, 1), max(channels // 4, 1)
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
