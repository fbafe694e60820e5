"""Input data: ImageNet-layout folders through DALI, the built-in demo data, synthetic batches.

``build_data`` is the only entry point the trainer needs. DALI is imported only when a folder
(or the demo data) is read, so ``import fastafd.data`` works without it.
"""

from __future__ import annotations

import torch

from fastafd.config import DataConfig
from fastafd.data.base import DatasetInfo, Loader, per_rank_batch
from fastafd.data.demo import DEMO_CLASSES, demo_root
from fastafd.data.folder import FolderDataset, scan_folder

__all__ = ["DEMO_CLASSES", "DatasetInfo", "FolderDataset", "Loader", "build_data", "demo_root", "scan_folder"]


def build_data(cfg: DataConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device, seed: int,
               channels_last: bool) -> tuple[Loader, Loader, DatasetInfo]:
    """Train and validation loaders for this process, and a description of the dataset.

    synthetic: random device tensors; auto without a root: the built-in demo data (generated on
    first use); otherwise the ImageNet-layout folder at ``cfg.root``.
    """
    train_batch = per_rank_batch(cfg.batch_size, world_size, "data.batch_size")
    val_batch = per_rank_batch(cfg.eval_batch_size, world_size, "data.val_batch_size")

    if cfg.format == "synthetic":
        from fastafd.data.synthetic import build_synthetic_loaders

        train, val = build_synthetic_loaders(cfg, rank=rank, world_size=world_size, device=device, seed=seed,
                                             channels_last=channels_last, train_batch=train_batch, val_batch=val_batch)
        info = DatasetInfo(num_classes=cfg.synthetic_classes, classes=[str(i) for i in range(cfg.synthetic_classes)],
                           train_size=len(train) * train_batch * world_size, val_size=len(val) * val_batch * world_size,
                           source="synthetic", root=None)
        return train, val, info

    if cfg.root is None:
        root, source = demo_root(progress=rank == 0), "demo"
    else:
        root, source = cfg.root, "folder"
    ds = scan_folder(root)

    from fastafd.data.dali import build_dali_loaders  # imports DALI (UserError if missing)

    train, val = build_dali_loaders(ds.train, ds.val, cfg, rank=rank, world_size=world_size, local_rank=local_rank,
                                    device=device, seed=seed, channels_last=channels_last,
                                    train_batch=train_batch, val_batch=val_batch)
    info = DatasetInfo(num_classes=len(ds.classes), classes=ds.classes, train_size=len(ds.train),
                       val_size=len(ds.val), source=source, root=ds.root)
    return train, val, info
