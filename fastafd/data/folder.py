"""Scan an ImageNet-layout folder: ``root/train/<class>/*`` and ``root/val/<class>/*``.

One ``os.scandir`` walk at start-up; the result (relative paths and labels) is handed to the
DALI readers, which never walk the tree themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastafd.errors import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
"""Image file extensions, matched case-insensitively."""

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    """The images of one split: paths relative to ``root`` and their labels (same order)."""

    root: Path
    files: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class FolderDataset:
    """An ImageNet-layout dataset; ``classes[label]`` is the class folder name."""

    root: Path
    classes: list[str]
    train: Split | None
    """None when scanned for evaluation only (``scan_folder(train=False)``)."""
    val: Split


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _listing(folder: Path) -> list[os.DirEntry]:
    """The non-hidden entries of ``folder``; an unreadable folder is a one-line :class:`UserError`."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as exc:
        raise UserError(f"cannot read the folder {folder} ({exc.strerror}): make it readable (chmod -R u+rX) "
                        "or move it out of the dataset") from None


def _kind(e: os.DirEntry) -> str:
    """'dir', 'file' or 'other' (what a symbolic link points to); a link loop or a link to nothing,
    which would silently drop a class or an image, is a one-line :class:`UserError`."""
    try:
        if e.is_dir():
            return "dir"
        if e.is_file():
            return "file"
    except OSError as exc:
        raise UserError(f"{e.path} cannot be followed ({exc.strerror}): a symbolic link loop; remove or fix "
                        "the link") from None
    if e.is_symlink():
        raise UserError(f"{e.path} is a symbolic link to nothing ({os.readlink(e.path)}): remove or fix the link")
    return "other"


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in ``split_dir`` (hidden folders skipped); none is an error."""
    names, loose_images = [], 0
    for e in _listing(split_dir):
        kind = _kind(e)
        if kind == "dir":
            names.append(e.name)
        elif _is_image(e.name):
            loose_images += 1
    if not names:
        if loose_images:
            raise UserError(
                f"{split_dir} holds {loose_images} images directly but no class folders: "
                f"move each image into {split_dir}/<class>/ (ImageNet layout)"
            )
        raise UserError(f"{split_dir} has no class folders: put the images in {split_dir}/<class>/*.JPEG")
    return sorted(names)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in ``split_dir`` (hidden folders skipped; may be empty)."""
    return sorted(e.name for e in _listing(split_dir) if _kind(e) == "dir")


def image_files(class_dir: Path) -> list[str]:
    """Sorted image file names in one class folder."""
    return sorted(e.name for e in _listing(class_dir) if _is_image(e.name) and _kind(e) == "file")


def read_exclude(path: Path | None, root: Path) -> set[str]:
    """The exclude list: paths relative to the dataset folder ``root`` (``train/<class>/<file>``),
    one a line; blank lines and ``#`` comments are ignored.

    An absolute path that lies under ``root`` is taken relative to it (so the list of a dataset
    that moved still matches its files); any other absolute path, or a relative one that climbs out
    of ``root``, cannot name one of its files and is refused (ignored, it would let the file it
    meant stop the run).
    """
    if path is None:
        return set()
    path = Path(path).expanduser()
    hint = f"write paths relative to {root} (train/<class>/<file>), as `fastafd data verify --exclude-out FILE` does"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the exclude list {path} ({exc.strerror}): "
                        "pass a file written by `fastafd data verify --exclude-out FILE`") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"the exclude list {path} is not a UTF-8 text file (byte {raw[exc.start]:#04x} at offset "
                        f"{exc.start}): {hint}") from None
    bases = {os.path.abspath(root), os.path.realpath(root)}
    out = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip().replace("\\", "/")
        if not line:
            continue
        rel = None
        if os.path.isabs(line):
            for target in (os.path.normpath(line), os.path.realpath(line)):
                rel = next((os.path.relpath(target, b) for b in bases if os.path.commonpath([b, target]) == b), None)
                if rel is not None:
                    break
            if rel is None:
                raise UserError(f"the exclude list {path} names {line} (line {n}), which is not under the dataset "
                                f"folder {root}: {hint}")
        else:
            rel = os.path.normpath(line)
        rel = rel.replace(os.sep, "/")
        if rel == "." or rel == ".." or rel.startswith("../"):
            raise UserError(f"the exclude list {path} names {line} (line {n}), which is not a file under the "
                            f"dataset folder {root}: {hint}")
        out.add(rel)
    return out


def _scan_split(split_dir: Path, class_to_label: dict[str, int], names: list[str],
                exclude: set[str] = frozenset()) -> Split:
    per_class = {name: image_files(split_dir / name) for name in names}
    if exclude:
        prefix = split_dir.name + "/"
        per_class = {name: [f for f in fs if f"{prefix}{name}/{f}" not in exclude] for name, fs in per_class.items()}
    if not any(per_class.values()):
        raise UserError(
            f"{split_dir} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)}): "
            f"put the images in {split_dir}/<class>/"
        )
    files: list[str] = []
    labels: list[int] = []
    for name in names:
        if not per_class[name]:
            raise UserError(
                f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        files.extend(f"{name}/{f}" for f in per_class[name])
        labels.extend([class_to_label[name]] * len(per_class[name]))
    return Split(root=split_dir, files=files, labels=labels)


def scan_folder(root: Path, exclude: set[str] = frozenset(), *, train: bool = True) -> FolderDataset:
    """Scan ``root`` once; class labels come from the sorted train class folders.

    ``exclude``: relative paths (``train/<class>/<file>``) to leave out (see :func:`read_exclude`);
    class labels never depend on it. ``train=False`` (evaluation): only ``val/`` is scanned for images;
    the labels still come from the names of ``train/``'s class folders when there is a ``train/``
    (a listing, not a scan of its images), else from ``val/``'s.

    Validation folders are mapped to labels by class name, so ``val/`` may hold a subset of the
    train classes. Every user mistake raises :class:`UserError` naming the path and the fix.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"dataset folder {root} does not exist: pass --data DIR with train/ and val/ class folders")
    if not root.is_dir():
        raise UserError(f"dataset path {root} is not a folder: pass --data DIR with train/ and val/ class folders")
    for split in SPLITS if train else ("val",):
        if not (root / split).is_dir():
            raise UserError(f"{root} has no {split}/ subfolder: use the ImageNet layout {root}/{split}/<class>/*.JPEG")

    has_train = (root / "train").is_dir()
    classes = _class_folders(root / "train" if has_train else root / "val")
    class_to_label = {name: i for i, name in enumerate(classes)}
    train_split = _scan_split(root / "train", class_to_label, classes, exclude) if train else None

    val_names = _class_folders(root / "val")
    unknown = [n for n in val_names if n not in class_to_label]
    if unknown:
        raise UserError(
            f"{root / 'val'} has class folders not in train/: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; rename or remove them so val classes match train classes"
        )
    val = _scan_split(root / "val", class_to_label, val_names, exclude)
    return FolderDataset(root=root, classes=classes, train=train_split, val=val)
