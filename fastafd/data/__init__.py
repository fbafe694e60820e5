"""Input data through DALI: ImageNet-layout folders, webdataset shards, CIFAR-100; the demo data; synthetic batches.

``build_data`` is the only entry point the trainer needs. DALI is imported only when a folder
(or the demo data) is read, so ``import fastafd.data`` works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastafd.config import DataConfig
from fastafd.data.base import DataError, DatasetInfo, Loader, per_rank_batch
from fastafd.data.demo import DEMO_CLASSES, demo_root
from fastafd.data.folder import FolderDataset, read_exclude, scan_folder
from fastafd.errors import UserError

if TYPE_CHECKING:
    from fastafd.data.shards import ShardDataset

__all__ = ["DEMO_CLASSES", "DataError", "DatasetInfo", "FolderDataset", "Loader", "build_data", "demo_root", "scan_folder"]


def resolve_format(cfg: DataConfig) -> str:
    """The format to read: ``cfg.format``, or for auto what ``cfg.root`` holds (demo when None)."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.root is None:
        return "demo"
    from fastafd.data.cifar import find_archive
    from fastafd.data.shards import is_shard_dir

    if is_shard_dir(cfg.root):
        return "shards"
    if find_archive(cfg.root) is not None:
        return "cifar100"
    return "folder"


def _check_val_headers(ds: FolderDataset | ShardDataset, root: Path) -> None:
    """Refuse a validation image that the first evaluation would stop at, before training starts.

    Training meets its own bad images within the first epoch; a bad validation image was found only
    at the first evaluation, after a whole epoch. A decode of every validation image costs what
    ``fastafd data verify`` costs, so this checks their first bytes only (empty, unreadable, text,
    a format DALI does not decode): 20-75 ms per 1,000 files (see
    :func:`~fastafd.data.formats.file_header_problems`; shards: :func:`~fastafd.data.shards.read_heads`).
    """
    from fastafd.data.formats import HEAD_BYTES, file_header_problems, header_problem

    if isinstance(ds, FolderDataset):
        bad = file_header_problems([str(ds.val.root / f) for f in ds.val.files])
    else:
        from fastafd.data.shards import read_heads

        samples = ds.val.samples
        bad = [(f"{s.tar}:{s.name}", why) for s, head in zip(samples, read_heads(samples, HEAD_BYTES))
               if (why := header_problem(head))]
    if bad:
        name, why = bad[0]
        more = f" (and {len(bad) - 1} more validation images)" if len(bad) > 1 else ""
        raise DataError(f"validation image {name}: {why}{more}; the first evaluation would stop at it, after a "
                        f"whole epoch of training: run `fastafd data verify {root} --exclude-out FILE` and train "
                        "with --data.exclude FILE")


def build_data(cfg: DataConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device, seed: int,
               channels_last: bool, dtype: torch.dtype = torch.float32) -> tuple[Loader, Loader, DatasetInfo]:
    """Train and validation loaders for this process, and a description of the dataset.

    synthetic: random device tensors; auto without a root: the built-in demo data (generated on
    first use); folder / shards / cifar100: the dataset at ``cfg.root`` (auto detects which).
    ``dtype``: the image dtype handed to the model (float32, float16 or bfloat16).
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

    fmt = resolve_format(cfg)
    if fmt != "demo" and cfg.root is None:
        layout = " (ImageNet layout: DIR/train/<class>/..., DIR/val/<class>/...)" if fmt == "folder" else ""
        raise UserError(f"data.format={fmt} reads a dataset: pass --data DIR{layout}")
    common = dict(rank=rank, world_size=world_size, local_rank=local_rank, device=device, seed=seed,
                  channels_last=channels_last, train_batch=train_batch, val_batch=val_batch, dtype=dtype)
    if fmt == "cifar100":
        from fastafd.data.cifar import load_cifar100

        ds = load_cifar100(cfg.root)
        from fastafd.data.cifar_dali import build_cifar_loaders  # imports DALI (UserError if missing)

        train, val = build_cifar_loaders(ds, cfg, **common)
        info = DatasetInfo(num_classes=len(ds.classes), classes=ds.classes, train_size=len(ds.train),
                           val_size=len(ds.val), source="cifar100", root=ds.root)
        return train, val, info

    if fmt == "demo":
        root, source = demo_root(progress=rank == 0), "demo"
    else:
        root, source = Path(cfg.root).expanduser(), fmt
    exclude = read_exclude(cfg.exclude, root)
    if fmt == "shards":
        from fastafd.data.shards import NotShards, read_shards

        try:
            ds = read_shards(root, exclude)
        except NotShards as exc:
            if cfg.format != "auto":
                raise
            raise NotShards(f"{exc} ({root} was taken for shards because it holds {exc.marker}; if it is an "
                            "image folder, pass --data.format folder)") from None
    else:
        ds = scan_folder(root, exclude)
    _check_val_headers(ds, root)

    from fastafd.data.dali import build_dali_loaders  # imports DALI (UserError if missing)

    train, val = build_dali_loaders(ds.train, ds.val, cfg, verify_root=str(ds.root), **common)
    info = DatasetInfo(num_classes=len(ds.classes), classes=ds.classes, train_size=len(ds.train),
                       val_size=len(ds.val), source=source, root=ds.root)
    return train, val, info
