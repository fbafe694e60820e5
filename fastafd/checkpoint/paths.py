"""The checkpoint folder's names: ``<run>/checkpoints/step-<9 digits>/`` and the files it holds."""

from __future__ import annotations

import re
from pathlib import Path

CKPT_DIR = "checkpoints"
MODEL = "model.safetensors"
OPTIM = "optim.safetensors"
STATE = "state.json"
MANIFEST = "MANIFEST.json"
BEST = "best.json"
FORMAT = 1


_STEP_NAME = re.compile(r"step-\d{9}")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:09d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, newest (highest step) first; temporary folders excluded."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)
