"""Which checkpoint: ``checkpoint.resume`` (:func:`resolve`), the one ``eval`` and ``export`` use (:func:`choose`), the newest
that loads (:func:`latest_valid`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from fastafd.checkpoint.paths import CKPT_DIR, list_checkpoints
from fastafd.checkpoint.retain import best_name, read_best
from fastafd.checkpoint.store import Checkpoint, CorruptCheckpoint, load
from fastafd.errors import UserError


def choose(run_dir: Path, which: str = "best") -> tuple[Checkpoint, str]:
    """The checkpoint ``eval`` and ``export`` use, and why: ``best`` (the one ``best.json`` names: the best
    ensemble top-1 of the evaluated epochs; the newest valid one if there is none yet or it is unreadable,
    said in the reason), ``latest`` (the newest valid one), or a checkpoint folder."""
    run_dir = Path(run_dir)
    if which not in ("best", "latest"):
        try:
            return load(Path(which)), f"{which} (given)"
        except CorruptCheckpoint as e:
            raise UserError(f"cannot use the checkpoint {which}: {e}") from None
    if which == "best" and (name := best_name(run_dir)) is not None:
        try:
            best = read_best(run_dir)
            return load(Path(run_dir) / CKPT_DIR / name), f"best by ensemble top-1 ({best['metric']:.2f})"
        except CorruptCheckpoint as e:
            warnings.warn(f"the best checkpoint {name} does not load ({e}); using the newest valid one", stacklevel=2)
    ckpt = latest_valid(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir} has no valid checkpoint in {run_dir / CKPT_DIR}: train it first")
    return ckpt, "newest" if which == "latest" else "newest (no evaluated best yet)"


def scan(run_dir: Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads, and each newer one that does not with why (folder, message)."""
    bad = []
    for path in list_checkpoints(run_dir):
        try:
            return load(path), bad
        except CorruptCheckpoint as e:
            bad.append((path, str(e)))
    return None, bad


def latest_valid(run_dir: Path, fix: str = "restore them from a copy, or train the run again") -> Checkpoint | None:
    """The newest checkpoint that loads (None: the run has none yet).

    Each newer one that does not load is reported with a warning naming the bad file and the one used
    instead. When the run has checkpoints and none of them loads: a one-line :class:`UserError` listing
    each and why, ending in ``fix``.
    """
    ckpt, bad = scan(run_dir)
    if ckpt is None and bad:
        why = "; ".join(f"{path.name}: {message.replace(f'{path}{os.sep}', '')}" for path, message in bad)
        raise UserError(f"none of the {len(bad)} checkpoints in {Path(run_dir) / CKPT_DIR} loads ({why}): {fix}")
    for _, message in bad:
        warnings.warn(f"skipping corrupt checkpoint: {message}; using {ckpt.path.name} instead", stacklevel=2)
    return ckpt


FRESH_FIX = (
    "restore them, resume from another checkpoint folder with --checkpoint.resume PATH, or start over in this folder with "
    "--checkpoint.resume fresh (the old files are moved into previous-<date>-<time>/, nothing is deleted)"
)


def resolve(spec: str, run_dir: Path | None) -> Checkpoint | None:
    """``checkpoint.resume``: ``auto`` (newest valid in the run folder, if any), ``none``, ``fresh`` or a folder.

    ``auto`` refuses a run folder whose checkpoints all fail to load (it would overwrite them);
    ``fresh`` starts from step 0 whatever the folder holds (the trainer first moves it aside).
    """
    if spec == "fresh":
        return None
    if run_dir is not None:
        read_best(run_dir)  # a garbage best.json is refused now, not at the next epoch end
    if spec == "none":
        if run_dir is not None and list_checkpoints(run_dir):
            raise UserError(
                f"{run_dir} already holds checkpoints but checkpoint.resume=none: use another --out, resume (auto), "
                "or start over in it with --checkpoint.resume fresh"
            )
        return None
    if spec == "auto":
        return latest_valid(run_dir, FRESH_FIX) if run_dir is not None else None
    path = Path(spec)
    if (path / CKPT_DIR).is_dir():  # a run folder was given
        ckpt = latest_valid(path, "pass one of its checkpoints/step-* folders that loads, or another run")
        if ckpt is None:
            raise UserError(f"no valid checkpoint in {path / CKPT_DIR}: pass a checkpoint folder or start fresh")
        return ckpt
    if not path.is_dir():
        raise UserError(f"checkpoint {path} not found: pass a run folder or one of its checkpoints/step-* folders")
    try:
        return load(path)
    except CorruptCheckpoint as e:
        raise UserError(f"cannot resume from {path}: {e}") from None
