"""The training state a checkpoint holds, captured from and restored into a live run.

Everything a run needs to continue exactly: every peer, transfer layer and discriminator; both (all)
optimizers and their schedules; the fp16 loss scale; the non-finite skip counters; epoch and step;
the RNG states of Python, NumPy, torch CPU and CUDA and the data-reader position of every rank;
the running training metrics of the current epoch; the resolved config. Only the main process
writes: the per-rank parts are gathered to it.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as tdist

from fastafd.checkpoint import codec, paths, store
from fastafd.comm import distributed
from fastafd.errors import UserError
from fastafd.metrics import RunningMeans
from fastafd.steps import Stages

if TYPE_CHECKING:
    from fastafd.data import Loader

STRUCTURAL = ("model.peers", "model.num_classes", "model.pretrained", "method.name")
"""Config fields that change what the checkpoint's tensors mean: resuming with other values is refused.
So is another ``<slot>.name`` of each optimizer config the checkpoint's method uses (``Task.optimizers``):
SGD's momentum buffers are not Adam's moments."""

READER = ("data.", "system.seed")
"""Config fields the training reader's position depends on (file list, order, batch, augmentation):
refused when the checkpoint is in the middle of an epoch, allowed at an epoch end..."""

NOT_READER = ("data.val_batch_size", "data.val_crop_ratio", "data.num_threads", "data.decode_device")
"""...except these, which only touch evaluation or speed."""


@dataclass
class Position:
    """Where a restored run continues."""

    epoch: int
    """1-based epoch to (re)enter."""
    epoch_step: int
    """Steps of that epoch already done."""
    step: int
    """Global steps done."""


# -- RNG ------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(device: torch.device) -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


def _gather(obj: dict) -> list[dict]:
    """Every rank's ``obj`` on every rank (small JSON-ready dicts)."""
    if not distributed():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


# -- capture / restore ----------------------------------------------------------------------------


def capture(
    task: torch.nn.Module,
    stages: Stages,
    train_loader: Loader,
    meter: RunningMeans,
    pos: Position,
    config: dict,
    device: torch.device,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Collective: every rank contributes its RNG and reader state; returns (tensors, JSON state)."""
    ranks = _gather({"rng": rng_state(device), "loader": train_loader.state_dict()})
    optim_tensors, stage_state = stages.state_dict()
    state = {
        "epoch": pos.epoch,
        "epoch_step": pos.epoch_step,
        "step": pos.step,
        **stage_state,
        "meter": meter.state_dict(),
        "ranks": ranks,
        "config": config,
    }
    return {paths.MODEL: dict(task.state_dict()), paths.OPTIM: optim_tensors}, state


def restore(
    ckpt: store.Checkpoint,
    task: torch.nn.Module,
    stages: Stages,
    train_loader: Loader,
    meter: RunningMeans,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    same_schedule: bool,
) -> Position:
    """Load ``ckpt`` into the live run; returns where to continue."""
    st = ckpt.state
    saved_world = len(st["ranks"])
    codec.load_model(ckpt, task)
    optim = ckpt.tensors(paths.OPTIM)
    if set(st["stages"]) != set(stages):
        raise UserError(f"checkpoint {ckpt.path} has optimizer stages {sorted(st['stages'])}, this run {sorted(stages)}: same method needed")
    stages.load_state_dict(optim, st, same_schedule=same_schedule,
                           check=lambda name, sd, opt: codec.check_optimizer_state(ckpt, name, sd, opt))
    meter.load_state_dict(st["meter"], device)
    if saved_world == world_size:  # this rank's own random and reader state: the uninterrupted run, bitwise
        mine = st["ranks"][rank]
        set_rng_state(mine["rng"], device)
        train_loader.load_state_dict(mine["loader"])
    else:  # another number of processes: the global data position (rank 0's), fresh per-rank random streams
        set_rng_state(st["ranks"][0]["rng"], device)
        seed = int(st["config"]["system"]["seed"])
        torch.manual_seed(seed + 1000 * rank + 1 + int(st["step"]))
        random.seed(seed + 1000 * rank + 1 + int(st["step"]))
        np.random.seed((seed + 1000 * rank + 1 + int(st["step"])) % 2**32)
        train_loader.load_state_dict(st["ranks"][0]["loader"])
    return Position(epoch=int(st["epoch"]), epoch_step=int(st["epoch_step"]), step=int(st["step"]))


def config_changes(old: dict, new: dict, *, mid_epoch: bool = False) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's config and this run's, as 'key: old -> new'.

    ``mid_epoch``: the checkpoint is inside an epoch, so changes of :data:`READER` fields are refused
    (the saved reader position and augmentation state mean nothing for other data).
    """
    from fastafd.methods import registry

    try:
        slots = registry.get(old.get("method", {}).get("name", "")).optimizers
    except UserError:  # a method this fastafd does not know: refused below as a method.name difference
        slots = ()
    structural = STRUCTURAL + tuple(f"{slot}.name" for slot in slots)
    refused, allowed = [], []
    for key, (a, b) in _flat_diff(old, new).items():
        if key in ("out", "recipe", "checkpoint.resume"):
            continue
        moves_reader = mid_epoch and key.startswith(READER) and key not in NOT_READER
        (refused if key in structural or moves_reader else allowed).append(f"{key}: {a!r} -> {b!r}")
    return refused, allowed


DATASET_KEYS = ("num_classes", "source", "root", "train_size", "val_size")
"""The dataset summary a checkpoint records (``state.json``'s ``data``) and resume compares."""


def data_changes(old: dict | None, new: dict, *, mid_epoch: bool = False) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between the dataset a checkpoint was trained on and this run's,
    as 'dataset key: old -> new'. Another class count is always refused (the classifiers' size);
    another training set mid-epoch too. ``old`` None: a checkpoint from before fastafd recorded it."""
    if old is None:
        return [], []
    refused, allowed = [], []
    for key in DATASET_KEYS:
        a, b = old.get(key), new.get(key)
        if a != b:
            (refused if key == "num_classes" or (mid_epoch and key != "val_size") else allowed).append(f"dataset {key}: {a!r} -> {b!r}")
    return refused, allowed


def _flat_diff(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = prefix + key
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_flat_diff(a, b, name + "."))
        elif a != b:
            out[name] = (a, b)
    return out

