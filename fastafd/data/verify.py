"""``fastafd data verify``: find what would stop training before it starts, in every format training reads.

Errors (training would fail): zero-byte files, files that are not images (text, HTML, ...), image
formats DALI does not decode (GIF, ICO, ... even under a ``.JPEG`` name), truncated or corrupt
images, empty class folders, unreadable files; for shards also labels the loader cannot use.
Notes (odd, but they train and decode to RGB): grayscale and CMYK JPEGs, PNG (or other decodable)
data under a .JPEG name, palette or alpha images.

The verdict is DALI's: every image is decoded by DALI's CPU image decoder, the decoder training
uses without a GPU (on a GPU, JPEGs are decoded by nvJPEG instead), after the format rules of
:mod:`fastafd.data.formats`. PIL reads the headers for the notes and, for a file DALI refuses,
says why in words (truncated, corrupt). Checking with PIL alone passed files training then
refused: GIF data under a JPEG name, a PNG without its end chunk, a bilevel TIFF.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastafd.data.decode_errors import _cause
from fastafd.data.folder import IMAGE_EXTENSIONS, SPLITS, class_folders, image_files
from fastafd.data.formats import HEAD_BYTES, header_problem
from fastafd.errors import UserError
from fastafd.observe.progress import bar as progress_bar

_JPEG_NAMES = (".jpeg", ".jpg")
BATCH = 32
"""Images per DALI decode call."""


@dataclass
class Report:
    root: Path
    images: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(path relative to root, what is wrong)."""
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(path relative to root, what is odd)."""
    fmt: str = "folder"
    """The format that was checked: folder, shards or cifar100."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def bad_files(self) -> list[str]:
        """Files for the exclude list (empty class folders are not files and cannot be excluded)."""
        return sorted(p for p, why in self.errors if not why.startswith("empty class folder") and p not in SPLITS)

    def text(self, max_lines: int = 50) -> str:
        what = "samples" if self.fmt == "shards" else "images"
        out = [f"{self.root} ({self.fmt}): {self.images} {what}, {len(self.errors)} errors, {len(self.notes)} notes"]
        for kind, items in (("ERROR", self.errors), ("note", self.notes)):
            for path, why in items[:max_lines]:
                out.append(f"  {kind:<5} {path}: {why}")
            if len(items) > max_lines:
                out.append(f"  ... and {len(items) - max_lines} more {kind.lower()}s")
        if self.notes:
            kinds = Counter(why for _, why in self.notes)
            out.append("notes by kind: " + ", ".join(f"{why}: {n}" for why, n in kinds.most_common()))
        return "\n".join(out)


# -- one image ----------------------------------------------------------------------------------


def _notes(name: str, data: bytes) -> str | None:
    """What is odd about an image DALI decodes, from its header (PIL)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
    except Exception:  # noqa: BLE001 - DALI decodes it; PIL's opinion only feeds the notes
        return None
    notes = []
    if name.lower().endswith(_JPEG_NAMES) and fmt not in ("JPEG", "MPO"):
        notes.append(f"{fmt} data under a JPEG name")
    if mode in ("L", "LA", "1", "I", "I;16", "F"):
        notes.append("grayscale")
    elif mode == "CMYK":
        notes.append("CMYK")
    elif mode not in ("RGB",):
        notes.append(f"mode {mode}")
    return "; ".join(notes) or None


def _why_undecodable(data: bytes, dali_cause: str) -> str:
    """Words for an image of a decodable format that DALI failed on."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a finding
        if type(exc).__name__ == "UnidentifiedImageError":
            return f"corrupt (not an image PIL knows either; DALI: {dali_cause})"
        return f"truncated or corrupt ({exc})"
    return f"DALI cannot decode it, although PIL can ({dali_cause})"


@dataclass
class _Item:
    name: str
    """Path relative to the dataset root (what the report and the exclude list name)."""
    read: Callable[[], bytes]
    data: bytes = b""
    error: str | None = None
    note: str | None = None


def _load(item: _Item) -> _Item:
    """Read the bytes; the errors that need no decoder (unreadable, empty, not a decodable format)."""
    try:
        item.data = item.read()
    except OSError as exc:
        item.error = f"cannot read ({exc.strerror})"
        return item
    item.error = header_problem(item.data[:HEAD_BYTES])
    if item.error is None:
        item.note = _notes(item.name, item.data)
    return item


class _DaliDecoder:
    """DALI's CPU image decoder over batches of encoded images; names each image it refuses."""

    def __init__(self, threads: int) -> None:
        from fastafd.data.dali import fn, pipeline_def, types  # imports DALI (UserError if missing)

        @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None, exec_async=False,
                      exec_pipelined=False, prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        self._make = decode
        self._pipe = None

    def _run(self, datas: list[bytes]) -> str | None:
        """None when every image decodes, else DALI's cause (the pipeline is rebuilt after a failure)."""
        import numpy as np

        if self._pipe is None:
            self._pipe = self._make()
            self._pipe.build()
        self._pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        try:
            self._pipe.run()
        except RuntimeError as exc:
            self._pipe = None  # a DALI pipeline is unusable after an error
            return _cause(str(exc))
        return None

    def check(self, items: list[_Item]) -> None:
        """Set ``error`` on each item DALI does not decode: the batch at once, one by one if it fails."""
        todo = [it for it in items if it.error is None]
        if not todo or self._run([it.data for it in todo]) is None:
            return
        for it in todo:
            cause = self._run([it.data])
            if cause is not None:
                it.error, it.note = _why_undecodable(it.data, cause), None


def _workers(workers: int) -> int:
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check(report: Report, items: list[_Item], *, workers: int, progress: bool) -> None:
    """Decode every item; record errors and notes in ``report`` (in the order of ``items``)."""
    report.images += len(items)
    if not items:
        return
    decoder = _DaliDecoder(_workers(workers))
    bar = progress_bar(len(items), "fastafd: verifying", enabled=progress)

    def batches() -> Iterator[list[_Item]]:
        for start in range(0, len(items), BATCH):
            yield items[start:start + BATCH]

    with ThreadPoolExecutor(_workers(workers)) as pool:
        todo = batches()
        ahead = [pool.submit(_load, it) for it in next(todo, [])]
        while ahead:
            batch = [f.result() for f in ahead]
            ahead = [pool.submit(_load, it) for it in next(todo, [])]  # the next batch is read while this one decodes
            decoder.check(batch)
            for it in batch:
                if it.error:
                    report.errors.append((it.name, it.error))
                elif it.note:
                    report.notes.append((it.name, it.note))
                it.data = b""
            bar.update(len(batch))
    bar.close()


# -- the three formats ----------------------------------------------------------------------------


def verify_folder(root: Path, *, workers: int = 0, progress: bool = True) -> Report:
    """Check every image of an ImageNet-layout folder (``root/{train,val}/<class>/*``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass an ImageNet-layout dataset folder (train/ and val/)")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise UserError(f"{root} has neither train/ nor val/: pass an ImageNet-layout dataset folder")
    report = Report(root, fmt="folder")
    files: list[str] = []
    for split in splits:
        classes = class_folders(root / split)
        if not classes:
            report.errors.append((split, "no class folders"))
        for c in classes:
            names = image_files(root / split / c)
            if not names:
                report.errors.append((f"{split}/{c}", f"empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files): remove it or add images"))
            files.extend(f"{split}/{c}/{n}" for n in names)
    items = [_Item(f, (lambda p=root / f: p.read_bytes())) for f in files]
    _check(report, items, workers=workers, progress=progress)
    return report


def verify_shards(root: Path, *, workers: int = 0, progress: bool = True) -> Report:
    """Check a folder written by ``fastafd data pack``: the class map and indexes (one line and exit 2
    when broken, as training does), then every sample's label and image.

    Samples are named ``<split>/<class>/<name>.jpg`` (their key), which ``--data.exclude`` accepts.
    """
    from fastafd.data.shards import label_problems, read_sample, read_shards

    root = Path(root).expanduser()
    ds = read_shards(root, check_samples=False)
    report = Report(root, fmt="shards")
    items = []
    for split_name, split in (("train", ds.train), ("val", ds.val)):
        for s, why in label_problems(split.samples, len(ds.classes)):
            report.errors.append((f"{split_name}/{s.name}", why))
        items += [_Item(f"{split_name}/{s.name}", (lambda s=s: read_sample(s))) for s in split.samples]
    _check(report, items, workers=workers, progress=progress)
    return report


def verify_cifar(root: Path) -> Report:
    """Load the CIFAR-100 archive as training does (its arrays are the images: nothing to decode)."""
    from fastafd.data.cifar import load_cifar100

    ds = load_cifar100(root)
    return Report(ds.root, images=len(ds.train) + len(ds.val), fmt="cifar100")


def verify(root: Path, *, fmt: str = "auto", workers: int = 0, progress: bool = True) -> Report:
    """Check the dataset at ``root`` in format ``fmt`` (auto: detected as training detects it)."""
    from fastafd.data import registry

    root = Path(root).expanduser()
    dataset_format = registry.detect(root) if fmt == "auto" else registry.get(fmt)
    if dataset_format.verify is None:
        raise UserError(f"--format {fmt} reads no files to verify: choose one of {', '.join(registry.names(verifiable=True))}")
    with registry.detected_as(dataset_format, root, detected=fmt == "auto", option="--format"):
        return dataset_format.verify(root, workers, progress)
