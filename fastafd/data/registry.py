"""The dataset formats (``data.format``): one :class:`DatasetFormat` object each, in one table.

A format says how to recognise a folder of its kind (``detect``, for ``data.format=auto``), how to
build this process's loaders from it (``build``; an :class:`ImageFormat` splits that into ``open``:
the dataset's files and labels, ``val_problems``: the validation images the first evaluation would
stop at, and ``reader``: the DALI reader of a split), and how ``fastafd data verify`` checks it
(``verify``). Training (:func:`fastafd.data.build_data`), ``fastafd data verify``, the sweep's data
check and the command line's choices all read this table, so a new format is its reader module and
one :func:`register` call: the built-in ones are in :mod:`fastafd.data.builtin`; other packages
register theirs through the ``fastafd.data_formats`` entry point group.

(Not to be confused with :mod:`fastafd.data.formats`: the image file formats DALI decodes.)
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastafd.data.base import NotThisFormat
from fastafd.errors import unknown_name

if TYPE_CHECKING:
    import torch

    from fastafd.config import DataConfig
    from fastafd.data.base import DatasetInfo, Loader
    from fastafd.data.verify import Report

ENTRY_POINTS = "fastafd.data_formats"
"""Entry point group of formats defined by other packages (each entry: a module that calls :func:`register`)."""

FALLBACK = "folder"
"""What ``auto`` reads when no format's ``detect`` recognises the folder."""


@dataclass(frozen=True)
class Request:
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
    detected: bool = False
    """The format was detected (``data.format=auto``), not named: an error says how to name another."""

    def common(self) -> dict:
        return dict(rank=self.rank, world_size=self.world_size, local_rank=self.local_rank, device=self.device, seed=self.seed,
                    channels_last=self.channels_last, train_batch=self.train_batch, val_batch=self.val_batch, dtype=self.dtype)


Built = tuple["Loader | None", "Loader", "DatasetInfo"]
"""Train loader (None for evaluation only), validation loader, the dataset's description."""


@dataclass(frozen=True)
class DatasetFormat:
    """One ``data.format``."""

    name: str
    summary: str
    """One line for the help."""
    build: Callable[[DatasetFormat, Request], Built]
    """This process's loaders and the dataset's description."""
    detect: Callable[[Path], bool] | None = None
    """Does this folder hold this format (``auto``; tried in table order, :data:`FALLBACK` last)."""
    verify: Callable[[Path, int, bool], Report] | None = None
    """``fastafd data verify ROOT`` of this format: ``(root, workers, progress)``; None: nothing to verify."""
    reads_root: bool = True
    """Reads a dataset at ``data.root`` (False: synthetic, the demo data)."""
    choosable: bool = True
    """A value of ``--data.format`` (False: the demo data, what ``auto`` reads without a root)."""
    root_hint: str = ""
    """Appended to "pass --data DIR" when the root is missing (the layout expected)."""


@dataclass(frozen=True)
class ImageFormat(DatasetFormat):
    """A format of image files that DALI reads (folder, shards, the demo data): ``build`` is :func:`build_images`."""

    open: Callable[[Path, set[str], bool], Any] | None = None
    """``(root, exclude, train)`` -> a dataset with ``root``, ``classes``, ``train`` and ``val`` splits."""
    val_problems: Callable[[Any], list[tuple[str, str]]] | None = None
    """``(dataset)`` -> ``(image, what is wrong)`` for the validation images whose first bytes DALI would stop at."""
    reader: Callable[[Any], Any] | None = None
    """``(split)`` -> the DALI reader of the split (:class:`fastafd.data.dali_readers.Reader`)."""
    root: Callable[[Request], Path] | None = None
    """The folder to read (default: ``data.root``; the demo data: generated on first use)."""


_FORMATS: dict[str, DatasetFormat] = {}
_loaded = False


def register(fmt: DatasetFormat) -> DatasetFormat:
    """Make ``fmt`` a value of ``--data.format`` (and of ``fastafd data verify --format`` when it verifies)."""
    if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
        raise ValueError(f"data format {fmt.name!r} is registered twice")
    if fmt.name == "auto":
        raise ValueError("'auto' is not a format name (it detects one)")
    _FORMATS[fmt.name] = fmt
    return fmt


def _load() -> dict[str, DatasetFormat]:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("fastafd.data.builtin")
        for ep in entry_points(group=ENTRY_POINTS):
            importlib.import_module(ep.value)
    return _FORMATS


def names(*, verifiable: bool = False) -> tuple[str, ...]:
    """The values of ``--data.format`` besides auto, in table order (``verifiable``: those ``data verify`` checks)."""
    return tuple(n for n, f in _load().items() if f.choosable and (f.verify is not None or not verifiable))


def get(name: str) -> DatasetFormat:
    formats = _load()
    if name not in formats:
        raise unknown_name("data format", name, formats, f"choose from auto, {', '.join(names())}")
    return formats[name]


def detect(root: Path) -> DatasetFormat:
    """The format of the dataset folder ``root``, as ``data.format=auto`` sees it."""
    formats = _load()
    for fmt in formats.values():
        if fmt.detect is not None and fmt.detect(Path(root).expanduser()):
            return fmt
    return formats[FALLBACK]


def resolve(cfg: DataConfig) -> DatasetFormat:
    """The format to read: ``cfg.format``, or for auto what ``cfg.root`` holds (the demo data when None)."""
    if cfg.format != "auto":
        return get(cfg.format)
    if cfg.root is None:
        return get("demo")
    return detect(cfg.root)


@contextlib.contextmanager
def detected_as(fmt: DatasetFormat, root: Path, *, detected: bool, option: str) -> Iterator[None]:
    """When ``auto`` picked ``fmt`` and its reader finds the folder is not one, say why it was picked and how to
    name the format (``option``: ``--data.format`` or ``--format``)."""
    try:
        yield
    except NotThisFormat as exc:
        if not detected:
            raise
        raise type(exc)(f"{exc} ({root} was taken for {fmt.name} because it holds {exc.marker}; if it is an "
                        f"image folder, pass {option} {FALLBACK})") from None


def build_images(fmt: DatasetFormat, r: Request) -> Built:
    """Image files read by DALI: opened (listing, labels, exclude list), validation headers checked, then read."""
    from fastafd.data.base import DataError, DatasetInfo
    from fastafd.data.folder import read_exclude

    assert isinstance(fmt, ImageFormat) and fmt.open is not None and fmt.reader is not None
    cfg = r.cfg
    root = fmt.root(r) if fmt.root is not None else Path(cfg.root).expanduser()
    exclude = read_exclude(cfg.exclude, root)
    with detected_as(fmt, root, detected=r.detected, option="--data.format"):
        ds = fmt.open(root, exclude, r.train)
    # Refuse a validation image that the first evaluation would stop at, before training starts: training meets
    # its own bad images within the first epoch, a bad validation image only after a whole epoch. A decode of
    # every validation image costs what `fastafd data verify` costs, so this checks their first bytes only
    # (20-75 ms per 1,000 files, see fastafd.data.formats.file_header_problems).
    bad = fmt.val_problems(ds) if fmt.val_problems is not None else []
    if bad:
        name, why = bad[0]
        more = f" (and {len(bad) - 1} more validation images)" if len(bad) > 1 else ""
        raise DataError(f"validation image {name}: {why}{more}; the first evaluation would stop at it, after a "
                        f"whole epoch of training: run `fastafd data verify {root} --exclude-out FILE` and train "
                        "with --data.exclude FILE")

    from fastafd.data.dali import build_dali_loaders  # imports DALI (UserError if missing)

    train, val = build_dali_loaders(ds.train if r.train else None, ds.val, cfg, reader=fmt.reader, verify_root=str(ds.root),
                                    **r.common())
    info = DatasetInfo(num_classes=len(ds.classes), classes=ds.classes, train_size=len(ds.train) if ds.train else 0,
                       val_size=len(ds.val), source=fmt.name, root=ds.root)
    return train, val, info
