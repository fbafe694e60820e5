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
    """'folder', 'shards', 'cifar100', 'demo' or 'synthetic'."""
    root: Path | None


class DataError(UserError):
    """An input file that cannot be used, met while reading (names the file when it can be found)."""


class NotThisFormat(UserError):
    """Raised by a format's reader when a folder it was handed is not of its kind; ``marker``: the file that
    made ``data.format=auto`` take it for one (:func:`fastafd.data.registry.detected_as` then says how to
    name the right format)."""

    marker = ""


class Loader(Protocol):
    """One rank's view of a split.

    ``iter(loader)`` yields one epoch of ``(images, labels)``: images of logical shape (B, 3, H, W)
    in the loader's dtype (float32, or the run's bf16/fp16) on the loader's device (channels-last
    memory format when asked, else contiguous NCHW) and int64 labels of shape (B,). Epoch ``e`` of a
    training loader is a function of (seed, e, rank, world size) only: an epoch left unfinished
    (``loop.max_steps_per_epoch``) changes nothing that follows.

    Resume (training loaders): ``state_dict()`` is the JSON-ready global position of
    :mod:`fastafd.data.position` (epoch, global steps done) plus this rank's random state. A loader
    over the same data and seed given ``load_state_dict(state)`` and then ``set_epoch(e)`` yields from
    its next ``iter()`` the remaining steps of epoch ``e``: exactly the uninterrupted run's batches when
    ``state`` is its own rank's, this rank's share of the remaining samples when it is rank 0's state
    of a run with another number of processes. ``set_epoch`` with a later epoch drops the position
    (the epoch was cut short on purpose). Validation loaders keep no position (``state_dict() == {}``).
    """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Announce the epoch about to be iterated (0-based)."""
        ...

    def state_dict(self) -> dict:
        """The position to resume from (see the class docstring)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Resume at the position saved by :meth:`state_dict`."""
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


def to_model_layout(images: torch.Tensor, device: torch.device, *, channels_last: bool,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batch from the pipeline as logical (B, C, H, W) on ``device``.

    ``channels_last``: the pipeline wrote (B, H, W, C); the permuted view is channels-last memory.
    Otherwise it wrote contiguous (B, C, H, W) and the batch passes through.
    """
    if channels_last:
        images = images.permute(0, 3, 1, 2)
    images = images.to(device, non_blocking=True)
    if dtype is not None and images.dtype != dtype:  # bf16: DALI has no bfloat16 output; cast on the device
        images = images.to(dtype)
    return images


def check_split_sizes(*, train: tuple[object, int] | None, val: tuple[object, int], global_batch: int, world_size: int) -> None:
    """Refuse a training split smaller than one global batch (no step to take) or a validation split with
    fewer images than processes; ``train`` / ``val``: (where, images). One place for every data format."""
    if train is not None and train[1] < global_batch:
        raise UserError(f"{train[0]} has {train[1]} training images, fewer than one global batch of {global_batch}: "
                        "lower data.batch_size or add images")
    if val[1] < world_size:
        raise UserError(f"{val[0]} has {val[1]} validation images, fewer than the {world_size} processes: add validation images")
