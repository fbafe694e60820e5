"""What every data source hands to the trainer: loaders and a description of the dataset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fastafd.errors import UserError


@dataclass
class DatasetInfo:
    """The dataset behind the loaders."""

    num_classes: int
    classes: list[str]
    """Class names (folder names, sorted); the index is the label."""
    train_size: int
    """Images in the train split (all ranks together)."""
    val_size: int
    """Images in the validation split (all ranks together)."""
    source: str
    """'folder', 'demo' or 'synthetic'."""
    root: Path | None


class Loader(Protocol):
    """One rank's view of a split.

    ``iter(loader)`` yields one epoch of ``(images, labels)``: float32 images of logical shape
    (B, 3, H, W) on the loader's device (channels-last memory format when asked, else contiguous
    NCHW) and int64 labels of shape (B,).
    """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Announce the epoch about to be iterated (0-based)."""
        ...


def per_rank_batch(global_batch: int, world_size: int, option: str) -> int:
    """The per-process share of a global batch; it must divide evenly."""
    if global_batch % world_size:
        lower = max(world_size, global_batch // world_size * world_size)
        raise UserError(
            f"{option}={global_batch} is not divisible by the {world_size} processes: "
            f"use a multiple of {world_size}, e.g. {lower}"
        )
    return global_batch // world_size


def to_model_layout(images: torch.Tensor, device: torch.device, *, channels_last: bool) -> torch.Tensor:
    """A batch from the pipeline as logical (B, C, H, W) on ``device``.

    ``channels_last``: the pipeline wrote (B, H, W, C); the permuted view is channels-last memory.
    Otherwise it wrote contiguous (B, C, H, W) and the batch passes through.
    """
    if channels_last:
        images = images.permute(0, 3, 1, 2)
    return images.to(device, non_blocking=True)
