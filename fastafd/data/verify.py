"""``fastafd data verify``: find what would stop training before it starts.

Errors (training would fail): zero-byte files, files that are not images (text, HTML, ...),
truncated or corrupt images, empty class folders, unreadable files. Notes (odd, but they train and
decode to RGB): grayscale and CMYK JPEGs, PNG (or other) data under a .JPEG name, palette or
alpha images. Each image is fully decoded with PIL, in parallel worker processes.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fastafd.data.folder import IMAGE_EXTENSIONS, SPLITS, _is_image
from fastafd.errors import UserError

_JPEG_NAMES = (".jpeg", ".jpg")


@dataclass
class Report:
    root: Path
    images: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(path relative to root, what is wrong)."""
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(path relative to root, what is odd)."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def bad_files(self) -> list[str]:
        """Files for the exclude list (empty class folders are not files and cannot be excluded)."""
        return sorted(p for p, why in self.errors if not why.startswith("empty class folder"))

    def text(self, max_lines: int = 50) -> str:
        out = [f"{self.root}: {self.images} images, {len(self.errors)} errors, {len(self.notes)} notes"]
        for kind, items in (("ERROR", self.errors), ("note", self.notes)):
            for path, why in items[:max_lines]:
                out.append(f"  {kind:<5} {path}: {why}")
            if len(items) > max_lines:
                out.append(f"  ... and {len(items) - max_lines} more {kind.lower()}s")
        if self.notes:
            kinds = Counter(why for _, why in self.notes)
            out.append("notes by kind: " + ", ".join(f"{why}: {n}" for why, n in kinds.most_common()))
        return "\n".join(out)


def check_image(path: str) -> tuple[str | None, str | None]:
    """(error, note) for one file; both None when it is a plain RGB image of the format its name says."""
    from PIL import Image

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "zero-byte file", None
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        return f"cannot read ({exc.strerror})", None
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            im.load()
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a finding
        if _looks_like_text(head):
            return f"text, not an image (starts with {head[:24]!r})", None
        if type(exc).__name__ == "UnidentifiedImageError":
            return "not an image (unknown format)", None
        return f"truncated or corrupt ({exc})", None
    notes = []
    if path.lower().endswith(_JPEG_NAMES) and fmt != "JPEG":
        notes.append(f"{fmt} data under a JPEG name")
    if mode in ("L", "LA", "1", "I", "I;16", "F"):
        notes.append("grayscale")
    elif mode == "CMYK":
        notes.append("CMYK")
    elif mode not in ("RGB",):
        notes.append(f"mode {mode}")
    return None, "; ".join(notes) or None


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def verify_folder(root: Path, *, workers: int = 0, progress: bool = True) -> Report:
    """Check every image of an ImageNet-layout folder (``root/{train,val}/<class>/*``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass an ImageNet-layout dataset folder (train/ and val/)")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise UserError(f"{root} has neither train/ nor val/: pass an ImageNet-layout dataset folder")
    report = Report(root)
    files: list[str] = []
    for split in splits:
        classes = sorted(e.name for e in os.scandir(root / split) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            report.errors.append((split, "no class folders"))
        for c in classes:
            names = sorted(e.name for e in os.scandir(root / split / c) if e.is_file() and _is_image(e.name))
            if not names:
                report.errors.append((f"{split}/{c}", f"empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files): remove it or add images"))
            files.extend(f"{split}/{c}/{n}" for n in names)
    report.images = len(files)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    paths = [str(root / f) for f in files]
    bar = tqdm(total=len(files), desc="fastafd: verifying", unit="img", disable=not progress, mininterval=0.5)
    if workers > 1 and len(files) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results = []
            for r in pool.map(check_image, paths, chunksize=64):
                results.append(r)
                bar.update()
    else:
        results = []
        for p in paths:
            results.append(check_image(p))
            bar.update()
    bar.close()
    for rel, (err, note) in zip(files, results):
        if err:
            report.errors.append((rel, err))
        elif note:
            report.notes.append((rel, note))
    return report
