"""``fastafd data pack SRC OUT`` and ``fastafd data verify DIR``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tyro.conf import Positional

from fastafd.config import VerifiableFormat
from fastafd.errors import UserError

PROG = "fastafd data"
USAGE = f"""usage: {PROG} pack SRC OUT [options]   convert an ImageNet-layout folder into webdataset shards + DALI indexes
       {PROG} verify DIR [options]     find files that would stop training (exit 1 if any): folder, shards, CIFAR-100
({PROG} pack --help, {PROG} verify --help for the options)"""


@dataclass
class PackArgs:
    """Convert an ImageNet-layout folder (SRC/train/<class>/*, SRC/val/<class>/*) into webdataset tar
    shards with DALI index files and a class map (OUT/classes.json); train with --data OUT."""

    src: Positional[Path]
    """The ImageNet-layout dataset folder."""
    out: Positional[Path]
    """New (or empty) output folder."""
    shard_samples: int = 1000
    """Images per tar shard (ImageNet: 1,000 gives ~1,280 train shards of ~110 MB)."""
    seed: int = 0
    """Seed of the training samples' order in the shards."""
    exclude: Path | None = None
    """Exclude list (from `fastafd data verify --exclude-out`): these images are not packed."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class VerifyArgs:
    """Decode every image of a dataset the way training does (DALI's decoder; folder, shards or the
    CIFAR-100 archive); report what would stop training (errors, exit code 1) and what is odd but
    trains (notes: grayscale, CMYK, PNG data under a .JPEG name)."""

    dir: Positional[Path]
    """The dataset folder: ImageNet layout (train/ and/or val/), shards from `fastafd data pack`, or cifar-100-python."""
    format: VerifiableFormat = VerifiableFormat("auto")
    """The dataset's format; auto detects it as training does (--data.format)."""
    exclude_out: Path | None = None
    """Write the failing files here, one per line; pass it to training as --data.exclude FILE."""
    workers: int = 0
    """Decoding threads; 0: one per CPU core."""
    max_lines: int = 50
    """Errors and notes listed in full (the rest are counted)."""
    progress: bool = True
    """Show a progress bar."""


def cmd_data(argv: Sequence[str]) -> int:
    from fastafd.args import tyro_parse

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    sub, rest = argv[0], argv[1:]
    if sub == "pack":
        from fastafd.data.shards import pack

        a = tyro_parse(PackArgs, rest, prog=f"{PROG} pack", description=PackArgs.__doc__ or "")
        meta = pack(a.src, a.out, shard_samples=a.shard_samples, seed=a.seed, exclude=a.exclude, progress=a.progress)
        print(f"{a.out}: {meta['train']} train + {meta['val']} val images of {len(meta['classes'])} classes; "
              f"train with `fastafd train --data {a.out}`")
        return 0
    if sub == "verify":
        from fastafd.data.verify import verify

        a = tyro_parse(VerifyArgs, rest, prog=f"{PROG} verify", description=VerifyArgs.__doc__ or "")
        report = verify(a.dir, fmt=a.format, workers=a.workers, progress=a.progress)
        print(report.text(a.max_lines))
        if a.exclude_out is not None:
            bad = report.bad_files()
            try:
                a.exclude_out.write_text("".join(f + "\n" for f in bad))
            except OSError as exc:
                raise UserError(f"cannot write {a.exclude_out} ({exc.strerror}): choose a writable path") from exc
            print(f"wrote {len(bad)} paths to {a.exclude_out}: train with --data.exclude {a.exclude_out}")
        if report.ok:
            print("OK: nothing here would stop training")
            return 0
        print(f"{len(report.errors)} problems would stop training: fix them, or exclude the files "
              "(--exclude-out FILE, then train with --data.exclude FILE)", file=sys.stderr)
        return 1
    raise UserError(f"unknown subcommand '{sub}' of `{PROG}`: use pack or verify")
