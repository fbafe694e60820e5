"""Synthetic data for throughput benchmarks: a few random batches made once on the device.

Iterating costs no host work and no transfers: the same handful of device tensors is cycled.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastafd.config import DataConfig
from fastafd.errors import UserError

DISTINCT_BATCHES = 4
"""Distinct training batches cycled through (validation uses the first VAL_BATCHES of its own)."""

VAL_BATCHES = 2


class SyntheticLoader:
    """Cycles precomputed (images, labels) batches for ``length`` steps per epoch."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self._batches = batches
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self._length):
            yield self._batches[step % len(self._batches)]

    def set_epoch(self, epoch: int) -> None:
        """Nothing depends on the epoch."""


def _make_batches(count: int, batch: int, cfg: DataConfig, generator: torch.Generator, device: torch.device,
                  channels_last: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Standard-normal images (what normalisation produces) and uniform labels, moved once to device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator)
        labels = torch.randint(0, cfg.synthetic_classes, (batch,), generator=generator, dtype=torch.int64)
        out.append((images.to(device).contiguous(memory_format=fmt), labels.to(device)))
    return out


def build_synthetic_loaders(cfg: DataConfig, *, rank: int, world_size: int, device: torch.device, seed: int,
                            channels_last: bool, train_batch: int,
                            val_batch: int) -> tuple[SyntheticLoader, SyntheticLoader]:
    """Train loader of ``synthetic_samples // global batch`` steps, validation of VAL_BATCHES steps."""
    if cfg.synthetic_classes < 1:
        raise UserError(f"data.synthetic_classes={cfg.synthetic_classes} must be >= 1")
    steps = cfg.synthetic_samples // (train_batch * world_size)
    if steps < 1:
        raise UserError(
            f"data.synthetic_samples={cfg.synthetic_samples} is less than one global batch of "
            f"{train_batch * world_size}: raise data.synthetic_samples or lower data.batch_size"
        )
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    train = _make_batches(min(DISTINCT_BATCHES, steps), train_batch, cfg, generator, device, channels_last)
    val = _make_batches(VAL_BATCHES, val_batch, cfg, generator, device, channels_last)
    return SyntheticLoader(train, steps), SyntheticLoader(val, VAL_BATCHES)
