"""Synthetic data for throughput benchmarks: a few random batches made once on the device.

Iterating costs no host work and no transfers: the same handful of device tensors is cycled.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastafd.config import DataConfig
from fastafd.data import position
from fastafd.data.base import check_split_sizes
from fastafd.errors import UserError

DISTINCT_BATCHES = 4
"""Distinct training batches cycled through (validation uses the first VAL_BATCHES of its own)."""

VAL_BATCHES = 2


class SyntheticLoader:
    """Cycles precomputed (images, labels) batches for ``length`` steps per epoch; a training loader keeps
    the global position of :mod:`fastafd.data.position` (a resumed epoch yields its remaining steps)."""

    kind = "synthetic"

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], length: int, *, seed: int = 0,
                 global_batch: int = 0, rank: int = 0, world_size: int = 1, training: bool = False) -> None:
        self._batches = batches
        self._length = length
        self._training = training
        self._where = dict(seed=seed, global_batch=global_batch, rank=rank, world_size=world_size)
        self._pos = position.EpochPosition(length)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, start, _ = self._pos.begin()
        for step in range(start, self._length):
            self._pos.advance(step)
            yield self._batches[step % len(self._batches)]
        self._pos.end()

    def set_epoch(self, epoch: int) -> None:
        self._pos.set_epoch(epoch)

    def state_dict(self) -> dict:
        if not self._training:
            return {}
        epoch, step = self._pos.saved()
        return position.state(self.kind, epoch=epoch, step=step, **self._where)

    def load_state_dict(self, state: dict) -> None:
        if self._training:
            self._pos.load(position.check(state, kind=self.kind, **self._where))


def _make_batches(count: int, batch: int, cfg: DataConfig, generator: torch.Generator, device: torch.device,
                  channels_last: bool, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Standard-normal images (what normalisation produces) and uniform labels, moved once to device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator)
        labels = torch.randint(0, cfg.synthetic_classes, (batch,), generator=generator, dtype=torch.int64)
        out.append((images.to(device, dtype).contiguous(memory_format=fmt), labels.to(device)))
    return out


def build_synthetic_loaders(cfg: DataConfig, *, rank: int, world_size: int, device: torch.device, seed: int,
                            channels_last: bool, train_batch: int, val_batch: int,
                            dtype: torch.dtype = torch.float32) -> tuple[SyntheticLoader, SyntheticLoader]:
    """Train loader of ``synthetic_samples // global batch`` steps, validation of VAL_BATCHES steps."""
    if cfg.synthetic_classes < 1:
        raise UserError(f"data.synthetic_classes={cfg.synthetic_classes} must be >= 1")
    check_split_sizes(train=("data.synthetic_samples", cfg.synthetic_samples), val=("the synthetic validation set", world_size),
                      global_batch=train_batch * world_size, world_size=world_size)
    steps = cfg.synthetic_samples // (train_batch * world_size)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    train = _make_batches(min(DISTINCT_BATCHES, steps), train_batch, cfg, generator, device, channels_last, dtype)
    val = _make_batches(VAL_BATCHES, val_batch, cfg, generator, device, channels_last, dtype)
    return (SyntheticLoader(train, steps, seed=seed, global_batch=train_batch * world_size, rank=rank, world_size=world_size,
                            training=True), SyntheticLoader(val, VAL_BATCHES))
