"""The DALI readers of an image folder and of webdataset shards, as :mod:`fastafd.data.dali` uses them.

Imported by :mod:`fastafd.data.dali` only, after it has checked that DALI is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from nvidia.dali import fn

from fastafd.data.folder import Split
from fastafd.data.shards import LABEL_DIGITS, ShardSplit, read_sample

READER = "Reader"
"""Name of the reader operator (the DALI iterators size epochs and checkpoints by it)."""
SHUFFLE_BUFFER = 1024
"""Samples in the shard reader's shuffle buffer (DALI's default ``initial_fill``)."""


class FolderReader:
    """``fn.readers.file`` over a scanned folder split."""

    kind = "folder"

    def __init__(self, split: Split) -> None:
        self.split, self.root = split, str(split.root)

    def __len__(self) -> int:
        return len(self.split)

    def epoch_order(self, seed: int, epoch: int, world_size: int) -> np.ndarray:
        n = len(self.split)
        return np.random.default_rng([seed, epoch]).permutation(n)[: n // world_size * world_size]

    def node(self, *, order: np.ndarray | None, shard_id: int, num_shards: int, training: bool):
        files, labels = self.split.files, self.split.labels
        if order is not None:
            files, labels = [files[i] for i in order], [labels[i] for i in order]
        return fn.readers.file(
            file_root=self.root, files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
            random_shuffle=False, pad_last_batch=True, stick_to_shard=not training, name=READER,
        )

    def labels(self, lab: torch.Tensor) -> torch.Tensor:
        return lab.reshape(-1)

    def candidates(self, order: np.ndarray | None, begin: int, end: int) -> list[tuple[str, Callable[[], bytes]]]:
        idx = order[begin:end] if order is not None else range(begin, min(end, len(self.split)))
        root = self.split.root
        return [(str(root / self.split.files[i]), (lambda p=root / self.split.files[i]: p.read_bytes())) for i in idx]


class ShardReader:
    """``fn.readers.webdataset`` over indexed tar shards (see :mod:`fastafd.data.shards`)."""

    kind = "shards"

    def __init__(self, split: ShardSplit) -> None:
        self.split, self.root = split, str(split.root)
        self._powers: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.split)

    def epoch_order(self, seed: int, epoch: int, world_size: int) -> None:
        return None

    def node(self, *, order: None, shard_id: int, num_shards: int, training: bool):
        jpeg, cls = fn.readers.webdataset(
            paths=self.split.tars, index_paths=self.split.indexes, ext=["jpg", "cls"],
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

    def candidates(self, order: None, begin: int, end: int) -> list[tuple[str, Callable[[], bytes]]]:
        out = []
        for s in self.split.samples[begin:end]:
            out.append((f"{s.tar}:{s.name}", (lambda s=s: read_sample(s))))
        return out
