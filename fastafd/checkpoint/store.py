"""A checkpoint is a folder ``<run>/checkpoints/step-<9 digits>/`` holding ``model.safetensors``
(peers, transfer layers, discriminators), ``optim.safetensors`` (optimizer state tensors),
``state.json`` (epoch, step, optimizer hyper-parameters, schedules, loss scale, skip counters,
per-rank RNG states and data-reader positions, the resolved config) and, written last,
``MANIFEST.json`` with the size and SHA-256 of each file.

Writes are atomic: everything goes to a hidden temporary folder, each file is fsynced, the
manifest is written, the folder is renamed into place and the parent folder fsynced. A process
killed mid-write leaves only a temporary folder (``.tmp-step-N-<pid>-<random>``), which is ignored
and removed by the next write once its writer is dead.
Loading verifies the manifest; a corrupt or partial checkpoint is skipped with a warning naming the
bad file, and the previous good one is used.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastafd.checkpoint.paths import CKPT_DIR, FORMAT, MANIFEST, MODEL, OPTIM, STATE, list_checkpoints, step_dir
from fastafd.checkpoint.retain import _prune, _update_best
from fastafd.checkpoint.schema import _state_problem
from fastafd.errors import RunStopped
from fastafd.run import atomic, readback


class CorruptCheckpoint(Exception):
    """A checkpoint folder whose files do not match its manifest (or have none)."""


@dataclass
class Checkpoint:
    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return _load_safetensors(self.path / name)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors; anything that is not a safetensors file (a pickle, say) is refused."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path} is not a readable safetensors file ({e}); fastafd never unpickles checkpoints") from None


def write(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, *, keep: int, metric: float | None = None) -> Path:
    """Write checkpoint ``step`` atomically (main process only); prune old ones; track the best.

    ``tensors`` maps file names (``model.safetensors``, ...) to state dicts; ``state`` is JSON-ready.
    ``metric`` (ensemble top-1, at epoch ends) decides which checkpoint is kept as the best.
    """
    from fastafd import faults

    root = Path(run_dir) / CKPT_DIR
    final = step_dir(run_dir, step)
    tmp = root / atomic.temp_dir_name(final.name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp.mkdir()
        files = {}
        for name, tensor_dict in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()}, str(tmp / name))
            faults.point("checkpoint")  # tests: a SIGKILL in the middle of a write
        (tmp / STATE).write_text(json.dumps({**state, "format": FORMAT, "step": step}, indent=1))
        for name in [*tensors, STATE]:
            atomic.fsync_file(tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": atomic.sha256_file(tmp / name)}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        atomic.fsync_file(tmp / MANIFEST)
        if final.exists():  # a re-run of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic.fsync_dir(root)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = atomic.io_errno(e)
        if code is None:
            raise
        kept = next((p.name for p in list_checkpoints(run_dir) if p != final), "none yet")
        fix = "free space" if code in atomic.DISK_FULL else f"fix {root} ({atomic.os_error(code)})" if code != errno.EROFS else "fix the file system"
        raise RunStopped(
            f"{atomic.describe(code)} while writing checkpoint {final.name} into {root}: nothing half-written is left and the newest "
            f"checkpoint, {kept}, is kept; {fix}, then run the same command again to resume"
        ) from None
    if metric is not None:
        _update_best(run_dir, final, metric)
    _prune(run_dir, keep)
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Remove the temporary folders of writers that died mid-write (and this process's own leftovers);
    one whose writer is alive is being written right now and is left alone."""
    for stale in root.glob(".tmp-*"):
        pid = atomic.writer_pid(stale.name)
        if pid is not None and (pid == os.getpid() or not atomic.writer_alive(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def verify(path: Path) -> None:
    """Raise :class:`CorruptCheckpoint` naming the first file that does not match the manifest
    (or a manifest that is not one: not JSON, not an object, or without the checkpoint's files)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpoint(f"{manifest} is missing (the write did not finish)")
    try:
        content = readback.loads(readback.read_text(manifest))
    except (readback.Damaged, ValueError) as e:
        raise CorruptCheckpoint(f"{manifest} is unreadable ({e})") from None
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(files, dict):
        raise CorruptCheckpoint(f"{manifest} is not a checkpoint manifest (an object whose 'files' maps names to size and sha256)")
    missing = [name for name in (MODEL, OPTIM, STATE) if name not in files]
    if missing:
        raise CorruptCheckpoint(f"{manifest} does not list {', '.join(missing)}")
    for name, meta in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise CorruptCheckpoint(f"{manifest} names a file outside its folder ({name!r})")
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            raise CorruptCheckpoint(f"{manifest} has no size and sha256 for {name}")
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f} is missing")
        if f.stat().st_size != meta["size"] or atomic.sha256_file(f) != meta["sha256"]:
            raise CorruptCheckpoint(f"{f} does not match its checksum (truncated or corrupt)")


def load(path: Path) -> Checkpoint:
    """Load and verify one checkpoint folder: the manifest, ``state.json``'s shape, the safetensors files."""
    path = Path(path)
    verify(path)
    try:
        state = readback.loads(readback.read_text(path / STATE), nonfinite=True)  # a meter may hold a NaN loss
    except (readback.Damaged, ValueError) as e:
        raise CorruptCheckpoint(f"{path / STATE} is not JSON ({e})") from None
    if isinstance(state, dict) and state.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{path / STATE} has format {state.get('format')}, this fastafd reads {FORMAT}")
    if problem := _state_problem(state):
        raise CorruptCheckpoint(f"{path / STATE} {problem}")
    for name in (MODEL, OPTIM):
        if (path / name).exists():
            _load_safetensors(path / name)  # refuse anything that is not safetensors before using it
    return Checkpoint(path, state)


def save_weights(path: Path, module_state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a state dict to ``path`` atomically (unique temporary file, fsync, rename; an existing file is replaced)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module_state.items()}
    atomic.replace(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {}))
