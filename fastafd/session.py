"""What a run (training, or evaluating a trained run) builds before its first step: runtime, data, task.

Shared by :mod:`fastafd.trainer` and :mod:`fastafd.evaluate` (below both, so neither imports the other).
All validation of user input happens here, before anything is written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from fastafd import dist
from fastafd.config import TrainConfig
from fastafd.data import DatasetInfo, Loader, build_data
from fastafd.errors import UserError
from fastafd.methods import Numerics, Task, build_task
from fastafd.observe import console

SMALL_BN_BATCH = 32
"""Below this many images per process, BatchNorm statistics (per process: peers, transfer layers and
discriminators) get noisy enough to cost accuracy."""


@dataclass
class Session:
    """Everything a run builds before its first step."""

    config: TrainConfig
    runtime: dist.Runtime
    task: Task
    """Uncompiled; the trainer calls ``task.compile()`` when the run compiles."""
    train_loader: Loader | None
    """None for an evaluation session (``build_session(cfg, train=False)``)."""
    val_loader: Loader
    dataset: DatasetInfo


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def small_batch_warning(global_batch: int, world_size: int) -> str | None:
    """A one-line warning when several processes leave each fewer than :data:`SMALL_BN_BATCH` images."""
    per_process = global_batch // world_size
    if world_size == 1 or per_process >= SMALL_BN_BATCH:
        return None
    return (f"{per_process} images per process ({global_batch} over {world_size} processes): BatchNorm statistics are "
            f"per process and get noisy below {SMALL_BN_BATCH}; raise --data.batch_size or use fewer processes")


def build_session(cfg: TrainConfig, *, train: bool = True) -> Session:
    """Runtime, data and task of ``cfg`` on this process; ``train=False``: for evaluation (no training
    loader, no training split needed)."""
    runtime = dist.setup(cfg.system)
    if cfg.system.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if runtime.device.type == "cuda":  # fixed shapes (the last partial batch is dropped): let cuDNN pick its kernels once
        torch.backends.cudnn.benchmark = not cfg.system.deterministic
    # images arrive in the autocast dtype (bf16/fp16 on the device; DALI writes fp16 itself): the cast
    # autocast would do at the first convolution anyway, done once in the loader
    image_dtype = runtime.dtype
    train_loader, val_loader, dataset = dist.local_main_first(runtime, lambda: build_data(
        cfg.data, rank=runtime.rank, world_size=runtime.world_size, local_rank=runtime.local_rank, device=runtime.device,
        seed=cfg.system.seed, channels_last=runtime.channels_last, dtype=image_dtype, train=train,
    ), timeout_s=cfg.system.wait_timeout_s)
    if train and runtime.is_main and (warning := small_batch_warning(cfg.data.batch_size, runtime.world_size)):
        console.warn(warning)
    if cfg.model.num_classes and cfg.model.num_classes != dataset.num_classes:
        raise UserError(
            f"model.num_classes={cfg.model.num_classes} but the data has {dataset.num_classes} classes: "
            "use --model.num_classes 0 to take it from the data"
        )
    seed_everything(cfg.system.seed)  # identical initial parameters on every rank
    task = build_task(cfg, dataset.num_classes, Numerics(runtime.device.type, runtime.dtype), runtime.device, runtime.channels_last)
    seed_everything(cfg.system.seed + 1000 * runtime.rank + 1)  # per-rank stream for dropout and friends
    return Session(cfg, runtime, task, train_loader, val_loader, dataset)


def dataset_record(dataset: DatasetInfo) -> dict:
    """The dataset as ``env.json`` and checkpoints record it (a resume compares it with its own)."""
    return {"source": dataset.source, "root": str(dataset.root) if dataset.root else None, "num_classes": dataset.num_classes,
            "train_size": dataset.train_size, "val_size": dataset.val_size}
