"""Webdataset tar shards with DALI index files: ``fastafd data pack`` writes them, the shard reader reads them.

Layout written by :func:`pack` (``OUT``)::

    OUT/classes.json                 {"format": "fastafd-shards", "version": 1, "classes": [...], "train": N, "val": M}
    OUT/train/shard-000000.tar       samples <key>.jpg (the image bytes as they were) + <key>.cls
    OUT/train/shard-000000.idx       DALI index (the format of DALI's wds2idx, v1.2)
    OUT/val/...

``<key>`` is the image's path relative to its split without the extension (``n01440764/x``;
other dots become ``_``). ``.cls`` is the label as 6 ASCII digits (``000042``): webdataset tools
read it as an integer, and the fixed width lets DALI batch it as a dense tensor. Labels are the
indexes of the sorted train class folder names, exactly as the folder reader assigns them.
Training samples are written in a seeded random order (shards mix all classes), validation
samples in folder order.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastafd.data.base import DataError, NotThisFormat
from fastafd.data.folder import read_exclude, scan_folder
from fastafd.errors import UserError
from fastafd.observe.progress import bar as progress_bar

FORMAT = "fastafd-shards"
VERSION = 1
CLASSES_FILE = "classes.json"
LABEL_DIGITS = 6
IMAGE_EXT, LABEL_EXT = "jpg", "cls"


def sample_key(rel: str) -> str:
    """The webdataset key of an image at ``rel`` (relative to its split): dots and whitespace become
    ``_`` (an index line is whitespace-separated and webdataset splits the key at the first dot)."""
    stem, dot, _ext = rel.rpartition(".")
    return re.sub(r"[.\s]", "_", stem if dot else rel)


class NotShards(NotThisFormat):
    """A folder taken for shards (it holds :data:`CLASSES_FILE`) whose layout is not what pack writes."""

    marker = CLASSES_FILE


def is_shard_dir(root: Path) -> bool:
    return (Path(root) / CLASSES_FILE).is_file()


def check_classes(classes: object, where: Path) -> list[str]:
    """``classes`` when it is a non-empty list of unique non-empty strings (the label is the index)."""
    def bad(why: str) -> UserError:
        return UserError(f"{where}: 'classes' {why}; it must be the list of class names, label i = entry i: "
                         "re-run `fastafd data pack`")

    if not isinstance(classes, list):
        raise bad(f"is a {type(classes).__name__}, not a list")
    if not classes:
        raise bad("is empty")
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise bad(f"entry {i} is {c!r}, not a class name")
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        if c in seen:
            raise bad(f"names {c!r} twice (entries {seen[c]} and {i})")
        seen[c] = i
    return classes


# -- pack -------------------------------------------------------------------------------------------


def _write_shard(tar_path: Path, items: list[tuple[str, Path, int]]) -> None:
    """One tar of (key, image path, label) and its DALI index, each written to a temporary name
    and renamed into place."""
    lines = []
    tmp_tar = tar_path.with_name(tar_path.name + ".part")
    with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, path, label in items:
            parts = []
            for ext, data in ((IMAGE_EXT, path.read_bytes()), (LABEL_EXT, b"%0*d" % (LABEL_DIGITS, label))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                data_offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                parts.append(f"{ext} {data_offset} {len(data)} {info.name}")
            lines.append(" ".join(parts))
    idx_path = tar_path.with_suffix(".idx")
    tmp_idx = idx_path.with_name(idx_path.name + ".part")
    tmp_idx.write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
    os.replace(tmp_tar, tar_path)
    os.replace(tmp_idx, idx_path)


def _remove_partial(out: Path, created: Path | None) -> None:
    """Delete what a failed pack wrote: OUT was new or empty, so everything in it is pack's;
    ``created``: the outermost folder pack made (removed with everything in it)."""
    for name in ("train", "val"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / CLASSES_FILE).unlink(missing_ok=True)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def pack(src: Path, out: Path, *, shard_samples: int = 1000, seed: int = 0, exclude: Path | None = None,
         progress: bool = True) -> dict:
    """Convert the ImageNet-layout folder ``src`` into shards under ``out``; returns classes.json's content."""
    if shard_samples < 1:
        raise UserError(f"--shard-samples={shard_samples} must be >= 1")
    out = Path(out).expanduser()
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} exists and is not a folder: pack into a new folder (nothing was written)")
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty: pack into a new folder")
    except OSError as exc:
        raise UserError(f"cannot look into {out} ({exc.strerror}): pack into a folder you can write") from None
    ds = scan_folder(src, read_exclude(exclude, Path(src).expanduser()))
    check_classes(ds.classes, Path(src) / "train")
    jobs = []
    for name, split in (("train", ds.train), ("val", ds.val)):
        order = np.random.default_rng(seed).permutation(len(split)) if name == "train" else np.arange(len(split))
        items = [(sample_key(split.files[i]), split.root / split.files[i], split.labels[i]) for i in order]
        keys = {k for k, _, _ in items}
        if len(keys) != len(items):
            raise UserError(f"{split.root} has images whose names differ only in the extension: rename them so each "
                            "class folder has one image per name")
        for n, start in enumerate(range(0, len(items), shard_samples)):
            jobs.append((out / name / f"shard-{n:06d}.tar", items[start:start + shard_samples]))
    meta = {"format": FORMAT, "version": VERSION, "classes": ds.classes, "train": len(ds.train), "val": len(ds.val),
            "source": str(ds.root)}
    new = out.absolute()  # the outermost folder pack creates (OUT or a missing parent of it)
    while not new.parent.exists():
        new = new.parent
    created = new if not new.exists() else None
    try:
        for name in ("train", "val"):
            (out / name).mkdir(parents=True)
        with progress_bar(len(ds.train) + len(ds.val), "fastafd: packing", enabled=progress) as bar:
            for tar_path, items in jobs:
                _write_shard(tar_path, items)
                bar.update(len(items))
        (out / CLASSES_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    except (OSError, ValueError) as exc:  # unwritable or full OUT, an unreadable image, a name tar cannot hold
        _remove_partial(out, created)
        what = f"{exc.filename} ({exc.strerror})" if isinstance(exc, OSError) and exc.filename else f"({exc})"
        raise UserError(f"pack stopped at {what}: nothing was left in {out}; pick a writable folder with room "
                        "(or fix the image) and run it again") from None
    return meta


# -- read -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """Where one sample's image lies: for naming a failing sample and for verify."""

    tar: Path
    name: str
    """The image member's name in the tar (``<key>.jpg``)."""
    offset: int
    size: int
    label_offset: int = -1
    """Where the sample's ``.cls`` member lies in the tar (its label, :data:`LABEL_DIGITS` ASCII digits)."""
    label_size: int = 0


@dataclass(frozen=True)
class ShardSplit:
    """The shards of one split, in reading order, with the index files DALI is given."""

    root: Path
    tars: list[str]
    indexes: list[str]
    """Index file per tar: the original, or a filtered copy when the exclude list removed samples."""
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, keep: list[int]) -> ShardSplit:
        """The samples ``keep`` (indexes into :attr:`samples`) as a split of their own: the tars that hold
        them, each with a filtered index of just those samples (in a temporary folder that lives as long
        as the returned split). Used to continue an epoch on another number of processes."""
        wanted: dict[str, set[str]] = {}
        for i in keep:
            smp = self.samples[i]
            wanted.setdefault(str(smp.tar), set()).add(smp.name.rpartition(".")[0])
        tmp = _temp_index_folder()
        tars, indexes, samples = [], [], []
        try:
            for n, (tar, idx) in enumerate(zip(self.tars, self.indexes, strict=True)):
                if tar not in wanted:
                    continue
                head, body, parsed = _parse_index(Path(idx), Path(tar))
                lines = [(ln, smp) for ln, smp in zip(body, parsed, strict=True) if smp.name.rpartition(".")[0] in wanted[tar]]
                out = Path(tmp) / f"subset-{n:06d}-{Path(idx).name}"
                out.write_text(f"{head.split()[0]} {len(lines)}\n" + "".join(ln + "\n" for ln, _ in lines))
                tars.append(tar)
                indexes.append(str(out))
                samples.extend(smp for _, smp in lines)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        split = ShardSplit(root=self.root, tars=tars, indexes=indexes, samples=samples)
        _TEMP_INDEXES.append(weakref.finalize(split, shutil.rmtree, tmp, True))
        return split


@dataclass(frozen=True)
class ShardDataset:
    root: Path
    classes: list[str]
    train: ShardSplit | None
    """None when opened for evaluation only."""
    val: ShardSplit


def _parse_index(idx: Path, tar: Path) -> tuple[str, list[str], list[Sample]]:
    """Header line, sample lines and image locations of one index, checked against its tar.

    Checks what can be checked without reading the tar: the sample count, that every component
    lies inside the tar, and, for up to 9 samples spread over the file, that a tar header whose
    size field matches sits right before the data.
    """
    def bad(why: str) -> UserError:
        return UserError(f"index {idx} does not match its shard {tar} ({why}): recreate it with "
                         f"`wds2idx {tar} {idx}` or re-run `fastafd data pack`")

    try:
        lines = idx.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise bad("not a text file") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise bad("no 'v1.x COUNT' header line")
    body = [ln for ln in lines[1:] if ln.strip()]
    if int(head[1]) != len(body):
        raise bad(f"header says {head[1]} samples, {len(body)} listed")
    tar_size = tar.stat().st_size
    samples, components = [], []
    for ln in body:
        f = ln.split()
        if len(f) % 4:
            raise bad(f"malformed line '{ln[:80]}'")
        if not all(f[i + 1].isdigit() and f[i + 2].isdigit() for i in range(0, len(f), 4)):
            raise bad(f"malformed line '{ln[:80]}'")
        comps = [(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)]
        image = next((c for c in comps if c[0] == IMAGE_EXT), None)
        label = next((c for c in comps if c[0] == LABEL_EXT), None)
        if image is None or label is None:
            raise bad(f"sample '{ln[:80]}' lacks a .{IMAGE_EXT} or .{LABEL_EXT} component")
        for c in comps:
            if c[1] < tarfile.BLOCKSIZE or c[1] + c[2] > tar_size:
                raise bad(f"{c[3]} at offset {c[1]} + {c[2]} bytes lies outside the {tar_size}-byte tar")
        components.append(comps)
        samples.append(Sample(tar, image[3], image[1], image[2], label[1], label[2]))
    if components:
        picks = sorted({round(i * (len(components) - 1) / 8) for i in range(9)})
        with open(tar, "rb") as fh:
            for i in picks:
                for _ext, off, size, name in components[i]:
                    fh.seek(off - tarfile.BLOCKSIZE)
                    header = fh.read(tarfile.BLOCKSIZE)
                    try:
                        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
                    except tarfile.TarError:
                        raise bad(f"no tar header before {name} at offset {off}") from None
                    if info.size != size:
                        raise bad(f"{name}: the tar header says {info.size} bytes, the index {size}")
    return lines[0], body, samples


def read_labels(samples: list[Sample]) -> list[int | bytes]:
    """Each sample's label from its ``.cls`` member: an int, or the raw bytes when they are not
    :data:`LABEL_DIGITS` ASCII digits (the only form the loader decodes).

    The index says where every ``.cls`` lies but not what it holds, so this is one 6-byte
    ``pread`` per sample, on every start, on up to 8 tars at once. Measured on the project's 2-core
    CI machine (4,000 samples in 4 shards of 6 MB): about 2 ms per 1,000 samples with the tars in
    the page cache and 16-19 ms per 1,000 cold (caches dropped: one page read per sample; 35-40 ms
    read one tar at a time). For ImageNet's 1.33 M samples: about 3 s warm, 20 s from a cold
    local disk; ranks after the first on a node find the pages cached.
    """
    out: list[int | bytes] = []
    for raw in _pread_each(samples, lambda s: (s.label_offset, s.label_size)):
        out.append(int(raw) if len(raw) == LABEL_DIGITS and raw.isdigit() else raw)
    return out


def read_heads(samples: list[Sample], n: int) -> list[bytes]:
    """The first ``n`` bytes of each sample's image (same access pattern and cost as :func:`read_labels`)."""
    return _pread_each(samples, lambda s: (s.offset, min(n, s.size)))


def _pread_each(samples: list[Sample], span: Callable[[Sample], tuple[int, int]]) -> list[bytes]:
    """``span(sample)`` = (offset, size) read from each sample's tar: one open per tar, 8 tars at a time."""
    by_tar: dict[Path, list[int]] = {}
    for i, s in enumerate(samples):
        by_tar.setdefault(s.tar, []).append(i)
    out: list[bytes] = [b""] * len(samples)

    def read_tar(tar: Path) -> None:
        fd = os.open(tar, os.O_RDONLY)
        try:
            for i in by_tar[tar]:
                offset, size = span(samples[i])
                out[i] = os.pread(fd, size, offset)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(min(8, len(by_tar)) or 1) as pool:  # reads in flight on several tars at once
        list(pool.map(read_tar, by_tar))
    return out


def label_problems(samples: list[Sample], num_classes: int) -> list[tuple[Sample, str]]:
    """(sample, why) for every sample whose label the loader cannot use with ``num_classes`` classes."""
    out = []
    for s, label in zip(samples, read_labels(samples)):
        if isinstance(label, bytes):
            out.append((s, f"label {label[:16]!r} is not {LABEL_DIGITS} ASCII digits"))
        elif label >= num_classes:
            out.append((s, f"label {label} is outside the {num_classes} classes (valid: 0..{num_classes - 1})"))
    return out


_TEMP_INDEXES: list[weakref.finalize] = []
"""Removers of the filtered-index folders of this process's shard splits."""


def temp_index_count() -> int:
    """How many filtered-index folders this process has made so far (a mark for :func:`remove_temp_indexes`)."""
    return len(_TEMP_INDEXES)


def remove_temp_indexes(since: int = 0) -> None:
    """Delete the filtered-index folders (``fastafd-idx-*`` in the temp folder) this process made
    after the first ``since`` (see :func:`temp_index_count`).

    Each folder belongs to the :class:`ShardSplit` whose indexes it holds (DALI reads them whenever
    it builds a pipeline, so they live as long as the loaders): a finalizer removes it when the
    split is garbage-collected and at interpreter exit, and ``fastafd.cli.main`` calls this for the
    folders of its command on every way out of it (normal end, error, Ctrl-C, and SIGTERM once the
    trainer turns it into a clean stop). Only a kill that skips Python's exit (SIGKILL, or SIGTERM
    while nothing handles it) leaves one behind.
    """
    while len(_TEMP_INDEXES) > since:
        _TEMP_INDEXES.pop()()


def _temp_index_folder() -> str:
    try:
        return tempfile.mkdtemp(prefix="fastafd-idx-")
    except OSError as exc:
        raise UserError(f"cannot create a folder for the filtered shard indexes in {tempfile.gettempdir()} "
                        f"({exc.strerror}): set TMPDIR to a writable folder") from None


def _read_split(root: Path, split: str, exclude: set[str], num_classes: int, check_samples: bool) -> ShardSplit:
    d = root / split
    if not d.is_dir():
        raise NotShards(f"{root} has {CLASSES_FILE} but no {split}/ folder: re-run `fastafd data pack`")
    try:
        names = list(d.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read the folder {d} ({exc.strerror}): make it readable (chmod -R u+rX)") from None
    tars = sorted(p for p in names if p.suffix == ".tar")
    idxs = {p.with_suffix(".tar") for p in names if p.suffix == ".idx"}
    if not tars:
        raise NotShards(f"{d} has no .tar shards: re-run `fastafd data pack`")
    for t in tars:
        if t not in idxs:
            raise UserError(f"shard {t} has no index {t.with_suffix('.idx')}: create it with "
                            f"`wds2idx {t} {t.with_suffix('.idx')}` or re-run `fastafd data pack`")
    orphans = sorted(idxs - set(tars))
    if orphans:
        raise UserError(f"index {orphans[0].with_suffix('.idx')} has no shard {orphans[0]}: remove the index or restore the shard")
    excluded = {sample_key(e.split("/", 1)[1]) for e in exclude if e.startswith(split + "/")}
    index_paths, samples, tmp = [], [], None
    try:
        for t in tars:
            idx = t.with_suffix(".idx")
            head, body, s = _parse_index(idx, t)
            keep = [i for i, smp in enumerate(s) if smp.name.rpartition(".")[0] not in excluded] if excluded else range(len(s))
            if len(keep) != len(s):
                tmp = tmp or _temp_index_folder()
                idx = Path(tmp) / f"{split}-{idx.name}"
                idx.write_text(f"{head.split()[0]} {len(keep)}\n" + "".join(body[i] + "\n" for i in keep))
            index_paths.append(str(idx))
            samples.extend(s[i] for i in keep)
        if not samples:
            raise UserError(f"{d} has no samples left: check the shards and the exclude list")
        bad = label_problems(samples, num_classes) if check_samples else []
        if bad:
            s, why = bad[0]
            more = f" (and {len(bad) - 1} more samples)" if len(bad) > 1 else ""
            raise DataError(f"shard {s.tar} sample {s.name}: {why} of {root / CLASSES_FILE}{more}: re-run `fastafd "
                            f"data pack`, or list the samples with `fastafd data verify {root} --exclude-out FILE` "
                            "and train with --data.exclude FILE")
        out = ShardSplit(root=d, tars=[str(t) for t in tars], indexes=index_paths, samples=samples)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp is not None:
        _TEMP_INDEXES.append(weakref.finalize(out, shutil.rmtree, tmp, True))
    return out


def read_shards(root: Path, exclude: set[str] = frozenset(), *, check_samples: bool = True, train: bool = True) -> ShardDataset:
    """Open a folder written by :func:`pack`; every index is checked against its shard first.

    ``check_samples``: also read every sample's label (and raise :class:`DataError` for the first
    that the loader cannot use); ``fastafd data verify`` lists them all instead. ``train=False``
    (evaluation): the training split is not opened (``train`` is None).
    """
    root = Path(root).expanduser()
    where = root / CLASSES_FILE
    try:
        meta = json.loads(where.read_bytes())
    except (OSError, ValueError) as exc:
        raise NotShards(f"{where} is unreadable or not JSON ({exc}): point --data at a folder written by "
                        "`fastafd data pack`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "classes" not in meta:
        raise NotShards(f"{where} is not a fastafd class map (no \"format\": \"{FORMAT}\" and \"classes\"): "
                        "point --data at a folder written by `fastafd data pack`")
    classes = check_classes(meta["classes"], where)
    return ShardDataset(root=root, classes=classes,
                        train=_read_split(root, "train", exclude, len(classes), check_samples) if train else None,
                        val=_read_split(root, "val", exclude, len(classes), check_samples))


def read_sample(s: Sample) -> bytes:
    with open(s.tar, "rb") as fh:
        fh.seek(s.offset)
        return fh.read(s.size)

