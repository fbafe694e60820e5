"""fastafd's own dataset formats, one :class:`~fastafd.data.registry.DatasetFormat` each (the table's order is
auto-detection's: shards, cifar100, then folder for anything else). Each names its readers lazily, so that
listing the formats imports neither DALI nor a format's reader."""

from __future__ import annotations

from pathlib import Path

from fastafd.data.registry import DatasetFormat, ImageFormat, Request, build_images, register

_IMAGENET_LAYOUT = " (ImageNet layout: DIR/train/<class>/..., DIR/val/<class>/...)"


# -- folder: ImageNet layout ----------------------------------------------------------------------


def _open_folder(root: Path, exclude: set[str], train: bool):
    from fastafd.data.folder import scan_folder

    return scan_folder(root, exclude, train=train)


def _folder_val_problems(ds) -> list[tuple[str, str]]:
    from fastafd.data.formats import file_header_problems

    return file_header_problems([str(ds.val.root / f) for f in ds.val.files])


def _folder_reader(split):
    from fastafd.data.dali_readers import FolderReader

    return FolderReader(split)


def _verify_folder(root: Path, workers: int, progress: bool):
    from fastafd.data.verify import verify_folder

    return verify_folder(root, workers=workers, progress=progress)


def _demo_root(r: Request) -> Path:
    from fastafd.data.demo import demo_root

    return demo_root(progress=r.rank == 0)


# -- shards: `fastafd data pack`'s webdataset tars --------------------------------------------------


def _is_shards(root: Path) -> bool:
    from fastafd.data.shards import is_shard_dir

    return is_shard_dir(root)


def _open_shards(root: Path, exclude: set[str], train: bool):
    from fastafd.data.shards import read_shards

    return read_shards(root, exclude, train=train)


def _shards_val_problems(ds) -> list[tuple[str, str]]:
    from fastafd.data.formats import HEAD_BYTES, header_problem
    from fastafd.data.shards import read_heads

    samples = ds.val.samples
    return [(f"{s.tar}:{s.name}", why) for s, head in zip(samples, read_heads(samples, HEAD_BYTES)) if (why := header_problem(head))]


def _shard_reader(split):
    from fastafd.data.dali_readers import ShardReader

    return ShardReader(split)


def _verify_shards(root: Path, workers: int, progress: bool):
    from fastafd.data.verify import verify_shards

    return verify_shards(root, workers=workers, progress=progress)


# -- cifar100: the cifar-100-python archive ---------------------------------------------------------


def _is_cifar(root: Path) -> bool:
    from fastafd.data.cifar import find_archive

    return find_archive(root) is not None


def _build_cifar(fmt: DatasetFormat, r: Request):
    from fastafd.data.base import DatasetInfo
    from fastafd.data.cifar import load_cifar100

    ds = load_cifar100(r.cfg.root)
    from fastafd.data.cifar_dali import build_cifar_loaders  # imports DALI (UserError if missing)

    train, val = build_cifar_loaders(ds, r.cfg, train=r.train, **r.common())
    info = DatasetInfo(num_classes=len(ds.classes), classes=ds.classes, train_size=len(ds.train),
                       val_size=len(ds.val), source=fmt.name, root=ds.root)
    return train, val, info


def _verify_cifar(root: Path, workers: int, progress: bool):
    from fastafd.data.verify import verify_cifar

    return verify_cifar(root)


# -- synthetic: random device tensors -------------------------------------------------------------


def _build_synthetic(fmt: DatasetFormat, r: Request):
    from fastafd.data.base import DatasetInfo
    from fastafd.data.synthetic import build_synthetic_loaders

    cfg = r.cfg
    train, val = build_synthetic_loaders(cfg, rank=r.rank, world_size=r.world_size, device=r.device, seed=r.seed,
                                         channels_last=r.channels_last, train_batch=r.train_batch, val_batch=r.val_batch,
                                         dtype=r.dtype)
    info = DatasetInfo(num_classes=cfg.synthetic_classes, classes=[str(i) for i in range(cfg.synthetic_classes)],
                       train_size=len(train) * r.train_batch * r.world_size, val_size=len(val) * r.val_batch * r.world_size,
                       source=fmt.name, root=None)
    return (train if r.train else None), val, info


register(ImageFormat("folder", "ImageNet-layout folder", build_images, verify=_verify_folder, root_hint=_IMAGENET_LAYOUT,
                     open=_open_folder, val_problems=_folder_val_problems, reader=_folder_reader))
register(ImageFormat("shards", "the output of `fastafd data pack`", build_images, detect=_is_shards, verify=_verify_shards,
                     open=_open_shards, val_problems=_shards_val_problems, reader=_shard_reader))
register(DatasetFormat("cifar100", "the cifar-100-python archive folder", _build_cifar, detect=_is_cifar, verify=_verify_cifar))
register(DatasetFormat("synthetic", "random in-memory tensors", _build_synthetic, reads_root=False))
register(ImageFormat("demo", "the built-in demo images", build_images, reads_root=False, choosable=False,
                     open=_open_folder, val_problems=_folder_val_problems, reader=_folder_reader, root=_demo_root))
