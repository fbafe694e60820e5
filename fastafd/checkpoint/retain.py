"""Retention: ``best.json`` (the checkpoint with the best ensemble top-1) and pruning to ``checkpoint.keep``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from fastafd.checkpoint.paths import _STEP_NAME, BEST, CKPT_DIR, list_checkpoints
from fastafd.errors import UserError
from fastafd.run import atomic, readback


def _update_best(run_dir: Path, path: Path, metric: float) -> None:
    best_file = Path(run_dir) / CKPT_DIR / BEST
    best = read_best(run_dir)
    if best is None or metric > best["metric"] or not (Path(run_dir) / CKPT_DIR / best["name"]).is_dir():
        atomic.write_text(best_file, json.dumps({"name": path.name, "metric": metric}))


def read_best(run_dir: Path) -> dict | None:
    """``best.json`` (``{"name": "step-N", "metric": top-1}``), None when absent.

    One that is not that (edited, or written by something else) is refused with one line rather than
    treated as absent: the next epoch end would name a new best and pruning could then delete the
    real best checkpoint. The check runs before a run writes anything (see :func:`fastafd.checkpoint.choice.resolve`).
    """
    best_file = Path(run_dir) / CKPT_DIR / BEST
    if not best_file.is_file():
        return None
    try:
        best = readback.loads(readback.read_text(best_file))
    except (readback.Damaged, ValueError) as e:
        best, why = None, f"not JSON ({e})"
    else:
        why = "not an object with a step-* name and a finite metric"
    name, metric = (best.get("name"), best.get("metric")) if isinstance(best, dict) else (None, None)
    if not (isinstance(name, str) and _STEP_NAME.fullmatch(name) and isinstance(metric, int | float) and not isinstance(metric, bool)
            and math.isfinite(metric)):
        raise UserError(
            f"{best_file} is {why}: delete it (the best checkpoint is then tracked again from the next evaluation on; "
            "no checkpoint is touched) or restore it"
        )
    return best


def best_name(run_dir: Path) -> str | None:
    best = read_best(run_dir)
    return best["name"] if best else None


def _prune(run_dir: Path, keep: int) -> None:
    best = best_name(run_dir)
    for path in list_checkpoints(run_dir)[keep:]:
        if path.name != best:
            shutil.rmtree(path, ignore_errors=True)
