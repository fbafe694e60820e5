"""CIFAR-100 from the standard ``cifar-100-python`` archive folder (``train``, ``test``, ``meta``
pickles; fine labels), fed through DALI.

The images (60,000 x 32 x 32 x 3 bytes, 184 MB) are held in memory. Training: each epoch's global
sequence is a permutation of the training set drawn from (seed, epoch), and the pad-4 random crop
and the flip of every position are drawn with it (numpy) and applied by DALI (``fn.crop`` with
``out_of_bounds_policy="pad"``, then ``fn.crop_mirror_normalize``); each rank reads its slice of each
global step (:mod:`fastafd.data.position`). An epoch is a pure function of (seed, epoch), so resuming
at global step j on any number of processes is exact. Validation: the test set, in order, sharded
like the folder reader.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastafd.errors import UserError

ARCHIVE = "cifar-100-python"
FILES = ("train", "test", "meta")


def find_archive(root: Path) -> Path | None:
    """``root`` itself or ``root/cifar-100-python`` when it holds the archive's three pickles."""
    root = Path(root).expanduser()
    for d in (root, root / ARCHIVE):
        if all((d / f).is_file() for f in FILES):
            return d
    return None


@dataclass(frozen=True)
class CifarSplit:
    images: np.ndarray
    """(N, 32, 32, 3) uint8, HWC."""
    labels: np.ndarray
    """(N,) int32 fine labels."""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Cifar100:
    root: Path
    classes: list[str]
    train: CifarSplit
    val: CifarSplit


class _Forbidden(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct, whatever the numpy version

SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the archive (Python 2, numpy 1.x)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the same array pickled by numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
"""Every global the genuine archive's pickles refer to, and what each is resolved to (nothing is
imported by name). Its arrays (``data``) are numpy arrays, which ``ndarray.__reduce__`` pickles as
``_reconstruct(ndarray, (0,), b"b")`` + ``__setstate__`` with a ``dtype("u1")``; the rest (dicts,
lists, byte strings, ints) are plain pickle opcodes that need no global."""


class _ArchiveUnpickler(pickle.Unpickler):
    """An unpickler that can build only what the CIFAR-100 archive holds.

    ``pickle.load`` calls any importable callable a file names (``os.system`` via ``__reduce__``),
    so a crafted ``train`` file in a data folder would run code. ``find_class`` is the one place
    pickle turns a name into a callable (GLOBAL, STACK_GLOBAL and the extension-registry opcodes all
    go through it); refusing every name outside :data:`SAFE_GLOBALS` refuses that.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return SAFE_GLOBALS[module, name]
        except KeyError:
            raise _Forbidden(module, name) from None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArchiveUnpickler(fh, encoding="bytes").load()
    except _Forbidden as exc:
        raise UserError(f"{path} refers to {exc.what}, which a CIFAR-100 archive never holds: it is not a genuine "
                        "CIFAR-100 archive and was not loaded; re-extract cifar-100-python.tar.gz from the "
                        "official download") from None
    except Exception as exc:  # noqa: BLE001 - any failure means a damaged archive
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}): re-extract cifar-100-python.tar.gz") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR-100 (python) file: "
                        "re-extract cifar-100-python.tar.gz")
    return obj


def _split(path: Path) -> CifarSplit:
    d = _unpickle(path)
    try:
        data, labels = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"fine_labels"], dtype=np.int32)
    except KeyError as exc:
        raise UserError(f"{path} has no {exc.args[0]!r} entry: it is not a CIFAR-100 (python) file") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise UserError(f"{path}: data or fine_labels is not an array of the archive's kind ({exc}): it is not a "
                        "CIFAR-100 (python) file; re-extract cifar-100-python.tar.gz") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise UserError(f"{path}: data of shape {data.shape} and {len(labels)} labels, expected (N, 3072) and N")
    return CifarSplit(np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels)


def load_cifar100(root: Path) -> Cifar100:
    d = find_archive(root)
    if d is None:
        raise UserError(f"{root} is not a CIFAR-100 archive folder: pass the extracted {ARCHIVE}/ folder "
                        "(with train, test and meta) or its parent")
    meta = _unpickle(d / "meta")
    names = meta.get(b"fine_label_names")
    if names is None:
        raise UserError(f"{d / 'meta'} has no fine_label_names: it is not CIFAR-100's meta file")
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{d / 'meta'}: fine_label_names is not a list of names ({exc}): re-extract "
                        "cifar-100-python.tar.gz") from None
    train, val = _split(d / "train"), _split(d / "test")
    for s, name in ((train, "train"), (val, "test")):
        if len(s) and (s.labels.min() < 0 or s.labels.max() >= len(classes)):
            raise UserError(f"{d / name} has labels outside 0..{len(classes) - 1}")
    return Cifar100(root=d, classes=classes, train=train, val=val)


@dataclass(frozen=True)
class EpochPlan:
    """One training epoch's global sequence: sample indexes and each position's crop offsets and flip."""

    order: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    flip: np.ndarray

    def take(self, positions: list[int]) -> EpochPlan:
        """The plan of these positions of the sequence (one rank's share), in this order."""
        p = np.asarray(positions, dtype=np.int64)
        return EpochPlan(self.order[p], self.dx[p], self.dy[p], self.flip[p])


def epoch_plan(n: int, *, seed: int, epoch: int, pad: int, hflip: float) -> EpochPlan:
    """Epoch ``epoch``'s sequence and augmentation, for all ranks at once (a function of seed and epoch)."""
    perm = np.random.default_rng([seed, epoch, 0xC1FA]).permutation(n)
    rng = np.random.default_rng([seed, epoch, 0xA06])
    return EpochPlan(perm, rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n), (rng.random(n) < hflip).astype(np.int32))


def train_batches(split: CifarSplit, plan: EpochPlan, batch: int, pad: int) -> Iterator[tuple[list, ...]]:
    """external_source batches of ``plan`` (one rank's share, in order): images, labels, crop_pos_x/y, mirror."""
    denom = float(max(2 * pad, 1))
    for b in range(len(plan.order) // batch):
        sl = slice(b * batch, (b + 1) * batch)
        idx = plan.order[sl]
        yield (list(split.images[idx]), list(split.labels[idx].reshape(-1, 1)),
               list((plan.dx[sl] / denom).astype(np.float32)), list((plan.dy[sl] / denom).astype(np.float32)),
               list(plan.flip[sl]))
