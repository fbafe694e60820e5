"""Model checkpoints: tensors in safetensors (no pickle), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from fastafd.errors import UserError

WEIGHTS = "model.safetensors"


def save_weights(path: Path, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Save ``module.state_dict()`` to ``path`` atomically (temporary file, fsync, rename)."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata or {})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_weights(path: Path, module: nn.Module) -> None:
    """Load a safetensors state dict into ``module`` (strict: every key must match)."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train first, or pass the run directory that holds {WEIGHTS}")
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}): check the run's config")
