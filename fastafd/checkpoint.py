"""Checkpoints on disk: tensors in safetensors, everything else in JSON; never pickle.

A checkpoint is a folder ``<run>/checkpoints/step-<9 digits>/`` holding ``model.safetensors``
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
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastafd.errors import RunStopped, UserError
from fastafd.run import atomic, readback

CKPT_DIR = "checkpoints"
MODEL = "model.safetensors"
OPTIM = "optim.safetensors"
STATE = "state.json"
MANIFEST = "MANIFEST.json"
BEST = "best.json"
FORMAT = 1


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            _fsync_file(tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": atomic.sha256_file(tmp / name)}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        _fsync_file(tmp / MANIFEST)
        if final.exists():  # a re-run of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
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


def _update_best(run_dir: Path, path: Path, metric: float) -> None:
    best_file = Path(run_dir) / CKPT_DIR / BEST
    best = read_best(run_dir)
    if best is None or metric > best["metric"] or not (Path(run_dir) / CKPT_DIR / best["name"]).is_dir():
        atomic.write_text(best_file, json.dumps({"name": path.name, "metric": metric}))


def read_best(run_dir: Path) -> dict | None:
    """``best.json`` (``{"name": "step-N", "metric": top-1}``), None when absent.

    One that is not that (edited, or written by something else) is refused with one line rather than
    treated as absent: the next epoch end would name a new best and pruning could then delete the
    real best checkpoint. The check runs before a run writes anything (see :func:`resolve`).
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


def best_name(run_dir: Path) -> str | None:
    best = read_best(run_dir)
    return best["name"] if best else None


def _prune(run_dir: Path, keep: int) -> None:
    best = best_name(run_dir)
    for path in list_checkpoints(run_dir)[keep:]:
        if path.name != best:
            shutil.rmtree(path, ignore_errors=True)


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


_JSON_TYPES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
_STATE_KEYS = {"epoch": int, "epoch_step": int, "step": int, "stages": dict, "guard": dict, "meter": dict, "ranks": list, "config": dict}
"""What ``state.json`` must hold, and of which JSON type, for :func:`fastafd.state.restore` (``data``: optional)."""


def _kind_problem(where: str, value: object, kind: type) -> str | None:
    if isinstance(value, kind) and not isinstance(value, bool):
        return None
    return f"{where} is {'null' if value is None else type(value).__name__}, not {_JSON_TYPES[kind]}"


def _state_problem(state: object) -> str | None:
    """What is wrong with a parsed ``state.json`` (None: its shape is right)."""
    if not isinstance(state, dict):
        return f"is {type(state).__name__}, not a JSON object"
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            return f"has no '{key}'"
        if problem := _kind_problem(f"'{key}'", state[key], kind):
            return problem
    if state["epoch"] < 1 or state["epoch_step"] < 0 or state["step"] < 0:
        return f"has an impossible position (epoch {state['epoch']}, epoch_step {state['epoch_step']}, step {state['step']})"
    if not state["ranks"]:
        return "has no per-process state ('ranks' is empty)"
    for i, rank in enumerate(state["ranks"]):
        where = f"ranks[{i}]"
        if problem := _kind_problem(where, rank, dict) or _kind_problem(f"{where}.rng", rank.get("rng"), dict):
            return problem
        if rank.get("loader") is not None and (problem := _kind_problem(f"{where}.loader", rank["loader"], dict)):
            return problem
        for key, kind in (("python", list), ("numpy", list), ("torch", str)):
            if problem := _kind_problem(f"{where}.rng.{key}", rank["rng"].get(key), kind):
                return problem
    for name, stage in state["stages"].items():
        where = f"stages.{name}"
        if problem := _kind_problem(where, stage, dict) or _kind_problem(f"{where}.scheduler", stage.get("scheduler"), dict):
            return problem
        optimizer = stage.get("optimizer")
        if problem := _kind_problem(f"{where}.optimizer", optimizer, dict):
            return problem
        for key, kind in (("param_groups", list), ("scalars", dict)):
            if problem := _kind_problem(f"{where}.optimizer.{key}", optimizer.get(key), kind):
                return problem
    if "data" in state and (problem := _kind_problem("'data'", state["data"], dict)):
        return problem
    return None


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


# -- optimizer state <-> safetensors + JSON -------------------------------------------------------


def optimizer_to_safe(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into tensors (safetensors) and a JSON-ready rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    """Inverse of :func:`optimizer_to_safe`: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        p, pid, name = key.split("/", 2)
        if p == prefix:
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# -- plain weights (export, eval) ----------------------------------------------------------------


def save_weights(path: Path, module_state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a state dict to ``path`` atomically (unique temporary file, fsync, rename; an existing file is replaced)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module_state.items()}
    atomic.replace(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {}))


def load_model(ckpt: Checkpoint, module: nn.Module) -> None:
    """Load a checkpoint's model tensors into ``module`` (strict: same names, same shapes)."""
    state = ckpt.tensors(MODEL)
    own = module.state_dict()
    wrong = [(key, tuple(state[key].shape), tuple(own[key].shape)) for key in own if key in state and state[key].shape != own[key].shape]
    if wrong:
        key, theirs, ours = wrong[0]
        raise UserError(
            f"checkpoint {ckpt.path} does not match the model: {key} has shape {theirs} in {MODEL} but {ours} in this run's model "
            f"({len(wrong)} tensors differ): another class count or architecture? Resume with the run's settings, or start a new run"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt.path} does not match the model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}): "
            "check the run's config"
        )


def check_optimizer_state(ckpt: Checkpoint, prefix: str, state_dict: dict, optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizer state (from :func:`optimizer_from_safe`) that does not fit ``optimizer``'s parameters:
    ``load_state_dict`` does not check, and a wrong-shaped buffer would fail, or silently broadcast, at the next step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entries in state_dict["state"].items():
        if not 0 <= pid < len(params):
            raise UserError(f"checkpoint {ckpt.path}: {OPTIM} holds state for parameter {pid} of stage {prefix}, which has {len(params)}: "
                            "it does not belong to this run")
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[pid].shape:
                raise UserError(
                    f"checkpoint {ckpt.path} does not match the model: {prefix}/{pid}/{key} has shape {tuple(value.shape)} in {OPTIM} "
                    f"but the parameter {tuple(params[pid].shape)}: resume from another checkpoint (pass its folder to --checkpoint.resume)"
                )
