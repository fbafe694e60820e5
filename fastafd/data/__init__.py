"""Input data through DALI: ImageNet-layout folders, webdataset shards, CIFAR-100; the demo data; synthetic batches.

``build_data`` is the only entry point the trainer needs. DALI is imported only when a folder
(or the demo data) is read, so ``import fastafd.data`` works without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Request:
    """What every format's builder gets: the config and this process's place."""

    cfg: DataConfig
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    seed: int
    channels_last: bool
    dtype: torch.dtype
    train: bool
    train_batch: int
    val_batch: int

    def common(self) -> dict:
        return dict(rank=self.rank, world_size=self.world_size, local_rank=self.local_rank, device=self.device, seed=self.seed,
                    channels_last=self.channels_last, train_batch=self.train_batch, val_batch=self.val_batch, dtype=self.dtype)


Built = tuple["Loader | None", Loader, DatasetInfo]


def _synthetic(r: _Request) -> Built:
    from fastafd.data.synthetic import build_synthetic_loaders

    cfg = r.cfg
    train, val = build_synthetic_loaders(cfg, rank=r.rank, world_size=r.world_size, device=r.device, seed=r.seed,
                                         channels_last=r.channels_last, train_batch=r.train_batch, val_batch=r.val_batch,
                                         dtype=r.dtype)
    info = DatasetInfo(num_classes=cfg.synthetic_classes, classes=[str(i) for i in range(cfg.synthetic_classes)],
                       train_size=len(train) * r.train_batch * r.world_size, val_size=len(val) * r.val_batch * r.world_size,
                       source="synthetic", root=None)
    return (train if r.train else None), val, info


def _cifar100(r: _Request) -> Built:
    from fastafd.data.cifar import load_cifar100

    ds = load_cifar100(r.cfg.root)
    from fastafd.data.cifar_dali import build_cifar_loaders  # imports DALI (UserError if missing)

    train, val = build_cifar_loaders(ds, r.cfg, train=r.train, **r.common())
    info = DatasetInfo(num_classes=len(ds.classes), classes=ds.classes, train_size=len(ds.train),
                       val_size=len(ds.val), source="cifar100", root=ds.root)
    return train, val, info


def _images(fmt: str) -> Callable[[_Request], Built]:
    """Folders (and the demo data, a folder) and shards: scanned or opened, then read by DALI."""

    def build(r: _Request) -> Built:
        cfg = r.cfg
        if fmt == "demo":
            root, source = demo_root(progress=r.rank == 0), "demo"
        else:
            root, source = Path(cfg.root).expanduser(), fmt
        exclude = read_exclude(cfg.exclude, root)
        if fmt == "shards":
            from fastafd.data.shards import NotShards, read_shards

            try:
                ds = read_shards(root, exclude, train=r.train)
            except NotShards as exc:
                if cfg.format != "auto":
                    raise
                raise NotShards(f"{exc} ({root} was taken for shards because it holds {exc.marker}; if it is an "
                                "image folder, pass --data.format folder)") from None
        else:
            ds = scan_folder(root, exclude, train=r.train)
        _check_val_headers(ds, root)

        from fastafd.data.dali import build_dali_loaders  # imports DALI (UserError if missing)

        train, val = build_dali_loaders(ds.train if r.train else None, ds.val, cfg, verify_root=str(ds.root), **r.common())
        info = DatasetInfo(num_classes=len(ds.classes), classes=ds.classes, train_size=len(ds.train) if ds.train else 0,
                           val_size=len(ds.val), source=source, root=ds.root)
        return train, val, info

    return build


FORMATS: dict[str, Callable[[_Request], Built]] = {
    "synthetic": _synthetic,
    "cifar100": _cifar100,
    "folder": _images("folder"),
    "demo": _images("demo"),
    "shards": _images("shards"),
}
"""The builder of each data format (``resolve_format`` picks one for ``data.format=auto``)."""


def build_data(cfg: DataConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device, seed: int,
               channels_last: bool, dtype: torch.dtype = torch.float32, train: bool = True) -> Built:
    """Train and validation loaders for this process, and a description of the dataset.

    synthetic: random device tensors; auto without a root: the built-in demo data (generated on
    first use); folder / shards / cifar100: the dataset at ``cfg.root`` (auto detects which).
    ``dtype``: the image dtype handed to the model (float32, float16 or bfloat16). ``train=False``
    (evaluation): no training loader (None) and no training split needed (a folder's labels still
    come from its ``train/`` class folders when it has them).
    """
    fmt = resolve_format(cfg)
    if fmt not in ("demo", "synthetic") and cfg.root is None:
        layout = " (ImageNet layout: DIR/train/<class>/..., DIR/val/<class>/...)" if fmt == "folder" else ""
        raise UserError(f"data.format={fmt} reads a dataset: pass --data DIR{layout}")
    request = _Request(cfg, rank, world_size, local_rank, device, seed, channels_last, dtype, train,
                       train_batch=per_rank_batch(cfg.batch_size, world_size, "data.batch_size"),
                       val_batch=per_rank_batch(cfg.eval_batch_size, world_size, "data.val_batch_size"))
    return FORMATS[fmt](request)
