"""Input data through DALI: ImageNet-layout folders, webdataset shards, CIFAR-100; the demo data; synthetic batches.

``build_data`` is the only entry point the trainer needs; each format is one object in
:mod:`fastafd.data.registry`'s table (the built-in ones: :mod:`fastafd.data.builtin`). DALI is imported only when a folder
(or the demo data) is read, so ``import fastafd.data`` works without it.
"""

from __future__ import annotations

import torch

from fastafd.config import DataConfig
from fastafd.data import registry
from fastafd.data.base import DataError, DatasetInfo, Loader, per_rank_batch
from fastafd.data.demo import DEMO_CLASSES, demo_root
from fastafd.data.folder import FolderDataset, scan_folder
from fastafd.data.registry import Built, Request
from fastafd.errors import UserError

__all__ = ["DEMO_CLASSES", "DataError", "DatasetInfo", "FolderDataset", "Loader", "build_data", "demo_root", "scan_folder"]


def resolve_format(cfg: DataConfig) -> str:
    """The format to read: ``cfg.format``, or for auto what ``cfg.root`` holds (demo when None); see :mod:`fastafd.data.registry`."""
    return registry.resolve(cfg).name


def build_data(cfg: DataConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device, seed: int,
               channels_last: bool, dtype: torch.dtype = torch.float32, train: bool = True) -> Built:
    """Train and validation loaders for this process, and a description of the dataset.

    synthetic: random device tensors; auto without a root: the built-in demo data (generated on
    first use); folder / shards / cifar100: the dataset at ``cfg.root`` (auto detects which).
    ``dtype``: the image dtype handed to the model (float32, float16 or bfloat16). ``train=False``
    (evaluation): no training loader (None) and no training split needed (a folder's labels still
    come from its ``train/`` class folders when it has them).
    """
    fmt = registry.resolve(cfg)
    if fmt.reads_root and cfg.root is None:
        raise UserError(f"data.format={fmt.name} reads a dataset: pass --data DIR{fmt.root_hint}")
    request = Request(cfg, rank, world_size, local_rank, device, seed, channels_last, dtype, train,
                      train_batch=per_rank_batch(cfg.batch_size, world_size, "data.batch_size"),
                      val_batch=per_rank_batch(cfg.eval_batch_size, world_size, "data.val_batch_size"),
                      detected=cfg.format == "auto")
    return fmt.build(fmt, request)
