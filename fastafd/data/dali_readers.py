"""The DALI readers of an image folder and of webdataset shards, as :mod:`fastafd.data.dali` uses them.

Both implement :class:`Reader`: for training, :meth:`Reader.plan` says which samples of the split one
rank reads in one epoch from some global step on (:mod:`fastafd.data.position`: global step ``j`` is
samples ``[j G, (j + 1) G)`` of the epoch's global sequence), and :meth:`Reader.node` is the DALI
reader operator that reads them; for validation, the node reads this rank's fixed DALI shard.

Imported by :mod:`fastafd.data.dali` only, after it has checked that DALI is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from nvidia.dali import fn

from fastafd.data.folder import Split
from fastafd.data.position import rank_positions
from fastafd.data.shards import LABEL_DIGITS, ShardSplit, read_sample

READER = "Reader"
"""Name of the reader operator (the DALI iterators size epochs and checkpoints by it)."""
SHUFFLE_BUFFER = 1024
"""Samples in the shard reader's shuffle buffer (DALI's default ``initial_fill``)."""


def shard_range(n: int, shard: int, shards: int) -> tuple[int, int]:
    """Samples [begin, end) of ``shard`` when DALI splits ``n`` samples into ``shards`` (its formula)."""
    return shard * n // shards, (shard + 1) * n // shards


@dataclass(frozen=True)
class Plan:
    """What one rank's training pipeline reads in one epoch, from global step ``start`` on.

    ``samples``: indexes into the split, in reading order (through the shuffle buffer for shards, so
    there the order within a window of :data:`SHUFFLE_BUFFER` samples is DALI's); ``sharded``: read as
    DALI shard ``shard_id`` of ``num_shards`` of the whole split instead of as an explicit list.
    """

    samples: list[int]
    start: int
    shard_id: int = 0
    num_shards: int = 1
    sharded: bool = False


class Reader(Protocol):
    """What the training and validation loaders need from a split's reader."""

    kind: str
    root: str
    error_slack: int
    """Samples around a failing batch that may hold the bad file besides the batch itself (shuffle buffer)."""

    def __len__(self) -> int: ...

    def plan(self, *, seed: int, epoch: int, rank: int, world_size: int, batch: int, steps: int, start: int,
             saved_world_size: int | None) -> Plan:
        """This rank's samples of ``epoch`` from global step ``start``; ``saved_world_size``: the number of
        processes that read the steps before ``start`` when it differs from ``world_size`` (a resume on
        another number of processes), else None."""
        ...

    def node(self, plan: Plan | None, *, rank: int, world_size: int):
        """The DALI reader operator: ``plan`` for training, this rank's fixed shard when None (validation)."""
        ...

    def labels(self, lab: torch.Tensor) -> torch.Tensor: ...

    def candidates(self, samples: list[int]) -> list[tuple[str, Callable[[], bytes]]]:
        """(name, read bytes) of these samples, for naming a file DALI failed to decode."""
        ...


class FolderReader:
    """``fn.readers.file`` over a scanned folder split; epoch ``e``'s global sequence is a permutation
    drawn from (seed, e), and each rank reads an explicit list: its slice of every global step."""

    kind = "folder"
    error_slack = 0

    def __init__(self, split: Split) -> None:
        self.split, self.root = split, str(split.root)

    def __len__(self) -> int:
        return len(self.split)

    def plan(self, *, seed: int, epoch: int, rank: int, world_size: int, batch: int, steps: int, start: int,
             saved_world_size: int | None) -> Plan:
        order = np.random.default_rng([seed, epoch]).permutation(len(self.split))
        return Plan(samples=order[rank_positions(range(start, steps), rank, world_size, batch)].tolist(), start=start)

    def node(self, plan: Plan | None, *, rank: int, world_size: int):
        files, labels = self.split.files, self.split.labels
        if plan is None:  # validation: DALI's contiguous shard of the split, every sample once over the ranks
            return fn.readers.file(file_root=self.root, files=files, labels=labels, shard_id=rank, num_shards=world_size,
                                   random_shuffle=False, pad_last_batch=True, stick_to_shard=True, name=READER)
        return fn.readers.file(
            file_root=self.root, files=[files[i] for i in plan.samples], labels=[labels[i] for i in plan.samples],
            shard_id=0, num_shards=1, random_shuffle=False, pad_last_batch=True, name=READER,
        )

    def labels(self, lab: torch.Tensor) -> torch.Tensor:
        return lab.reshape(-1)

    def candidates(self, samples: list[int]) -> list[tuple[str, Callable[[], bytes]]]:
        root = self.split.root
        return [(str(root / self.split.files[i]), (lambda p=root / self.split.files[i]: p.read_bytes())) for i in samples]


class ShardReader:
    """``fn.readers.webdataset`` over indexed tar shards (see :mod:`fastafd.data.shards`).

    Tars are read in order, as they are meant to be: rank r reads DALI's contiguous range
    ``(r + e) % W`` of the split in epoch e (a rotation, so each rank sees other shards each epoch),
    through DALI's shuffle buffer (pack wrote the training samples in a random order). A resume on
    another number of processes cannot split one rank's shuffle buffer, so it takes each old range
    without its first ``start x old batch`` samples as what is left, cuts that into the new ranks'
    shares, and reads each share through a filtered index: up to :data:`SHUFFLE_BUFFER` samples per
    old rank (those in its buffer at the checkpoint) are then seen twice or not at all in that epoch.
    """

    kind = "shards"
    error_slack = SHUFFLE_BUFFER

    def __init__(self, split: ShardSplit) -> None:
        self.split, self.root = split, str(split.root)
        self._powers: dict[torch.device, torch.Tensor] = {}
        self._subsets: dict[tuple[int, ...], ShardSplit] = {}

    def __len__(self) -> int:
        return len(self.split)

    def plan(self, *, seed: int, epoch: int, rank: int, world_size: int, batch: int, steps: int, start: int,
             saved_world_size: int | None) -> Plan:
        n = len(self.split)
        if saved_world_size is None:
            shard = (rank + epoch) % world_size
            begin, end = shard_range(n, shard, world_size)
            return Plan(samples=list(range(begin, end)), start=start, shard_id=shard, num_shards=world_size, sharded=True)
        old_batch = batch * world_size // saved_world_size
        left: list[int] = []
        for q in range(saved_world_size):
            begin, end = shard_range(n, (q + epoch) % saved_world_size, saved_world_size)
            left.extend(range(begin + start * old_batch, end))
        share = (steps - start) * batch
        return Plan(samples=left[rank * share:(rank + 1) * share], start=start)

    def node(self, plan: Plan | None, *, rank: int, world_size: int):
        split, shard_id, num_shards, training = self.split, rank, world_size, plan is not None
        if plan is not None:
            if plan.sharded:
                shard_id, num_shards = plan.shard_id, plan.num_shards
            else:
                key = tuple(plan.samples)
                if key not in self._subsets:
                    self._subsets = {key: split.subset(plan.samples)}  # one resume's share; released with the next
                split, shard_id, num_shards = self._subsets[key], 0, 1
        jpeg, cls = fn.readers.webdataset(
            paths=split.tars, index_paths=split.indexes, ext=["jpg", "cls"],
            missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
            random_shuffle=training, initial_fill=SHUFFLE_BUFFER, pad_last_batch=True,
            stick_to_shard=not training, name=READER,
        )
        return jpeg, cls

    def labels(self, lab: torch.Tensor) -> torch.Tensor:
        """The .cls component: LABEL_DIGITS ASCII digits per sample (decoded where DALI left them: on the GPU
        with a GPU pipeline; the place values are made there once, not copied from the host every batch)."""
        powers = self._powers.get(lab.device)
        if powers is None:
            powers = self._powers[lab.device] = 10 ** torch.arange(LABEL_DIGITS - 1, -1, -1, dtype=torch.int64, device=lab.device)
        return ((lab.reshape(lab.shape[0], -1).to(torch.int64) - 48) * powers).sum(1)

    def candidates(self, samples: list[int]) -> list[tuple[str, Callable[[], bytes]]]:
        out = []
        for i in samples:
            s = self.split.samples[i]
            out.append((f"{s.tar}:{s.name}", (lambda s=s: read_sample(s))))
        return out
