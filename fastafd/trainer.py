"""The training loop: schedules, evaluation, metrics, checkpoints. It knows nothing about the method."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastafd import checkpoint, dist, rundir
from fastafd.config import TrainConfig
from fastafd.data import DatasetInfo, build_data
from fastafd.errors import UserError
from fastafd.methods import Numerics, Task, build_task
from fastafd.evaluate import evaluate
from fastafd.metrics import RunningMeans
from fastafd.optim import build_stages
from fastafd.steps import Stage, StepGuard


@dataclass
class Session:
    """Everything a run builds before its first step."""

    cfg: TrainConfig
    rt: dist.Runtime
    task: Task
    train_loader: object
    val_loader: object
    info: DatasetInfo


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_session(cfg: TrainConfig) -> Session:
    """Runtime, data and task: all validation of user input happens here, before anything is written."""
    if cfg.data.format == "folder" and cfg.data.root is None:
        raise UserError(f"recipe {cfg.recipe} reads a dataset folder: pass --data DIR (ImageNet layout: DIR/train/<class>/..., DIR/val/<class>/...)")
    rt = dist.setup(cfg.system)
    if cfg.system.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    with rt.accelerator.local_main_process_first():
        train_loader, val_loader, info = build_data(
            cfg.data,
            rank=rt.rank,
            world_size=rt.world_size,
            local_rank=rt.local_rank,
            device=rt.device,
            seed=cfg.system.seed,
            channels_last=rt.channels_last,
        )
    if cfg.model.num_classes and cfg.model.num_classes != info.num_classes:
        raise UserError(
            f"model.num_classes={cfg.model.num_classes} but the data has {info.num_classes} classes: "
            "use --model.num_classes 0 to take it from the data"
        )
    seed_everything(cfg.system.seed)  # identical initial parameters on every rank
    numerics = Numerics(device_type=rt.device.type, dtype=rt.dtype, compile=rt.compile)
    task = build_task(cfg, info.num_classes, numerics, rt.device, rt.channels_last)
    seed_everything(cfg.system.seed + 1000 * rt.rank + 1)  # per-rank stream for dropout and friends
    return Session(cfg, rt, task, train_loader, val_loader, info)


def _postfix(means: dict[str, list[float]], img_per_s: float) -> dict[str, str]:
    post = {"img/s": f"{img_per_s:.0f}"}
    for key in ("ce", "kl", "g_loss", "d_loss", "align"):
        if key in means:
            post[key] = "/".join(f"{v:.3f}" for v in means[key])
    return post


def _epoch_row(epoch: int, step: int, time_s: float, images: int, means: dict, stages: dict[str, Stage], evals: dict, names: list[str]) -> dict:
    row = {"epoch": epoch, "step": step, "time_s": round(time_s, 3), "img_per_s": round(images / time_s, 2)}
    row.update({k: v for k, v in evals.items() if k != "peers"})
    peers = evals["peers"]
    for k, name in enumerate(names):
        peers[k].update({f"train_{key}": values[k] for key, values in means.items() if len(values) == len(names)})
        peers[k]["name"] = name
    row["peers"] = peers
    row["lr"] = {name: s.lr for name, s in stages.items()}
    row["skipped_steps"] = int(next(iter(stages.values())).guard.skipped)  # host read, once per epoch
    return row


def train(cfg: TrainConfig) -> Path:
    """Train ``cfg``; returns the run directory."""
    s = build_session(cfg)
    rt, task = s.rt, s.task
    steps_per_epoch = len(s.train_loader)
    if cfg.loop.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.loop.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise UserError(
            f"the training split ({s.info.train_size} images) is smaller than one global batch ({cfg.data.batch_size}): "
            "lower --data.batch_size"
        )
    stages = build_stages(
        task.stages(),
        {"optim": cfg.optim, "adv_optim": cfg.adv_optim},
        global_batch=cfg.data.batch_size,
        epochs=cfg.loop.epochs,
        steps_per_epoch=steps_per_epoch,
        device=rt.device,
        guard=StepGuard(rt.device, fp16=rt.dtype == torch.float16, buffers=list(task.buffers())),
        grad_sync=dist.all_reduce_grads if rt.world_size > 1 else None,
        impl=cfg.system.optimizer_impl,
    )
    run_dir = cfg.out or rundir.default_run_dir(cfg.recipe)
    if rt.is_main:
        rundir.create(run_dir, cfg, {"world_size": rt.world_size, "device": str(rt.device), "dataset": _info_dict(s.info)})
    step = 0
    for epoch in range(1, cfg.loop.epochs + 1):
        means, images, time_s, step = _train_epoch(s, stages, epoch, step, steps_per_epoch)
        if epoch % cfg.loop.eval_interval and epoch != cfg.loop.epochs:
            continue
        evals = evaluate(task, s.val_loader)
        row = _epoch_row(epoch, step, time_s, images, means, stages, evals, task.names)
        if rt.is_main:
            rundir.append_metrics(run_dir, row)
            checkpoint.save_weights(run_dir / checkpoint.WEIGHTS, task, {"epoch": str(epoch), "step": str(step)})
            tops = "  ".join(f"{p['name']} {p['top1']:.2f}" for p in row["peers"])
            tqdm.write(f"epoch {epoch}/{cfg.loop.epochs}  top-1: {tops}  ensemble {row['ensemble_top1']:.2f}  {row['img_per_s']:.0f} img/s  {time_s:.1f} s")
    rt.accelerator.wait_for_everyone()
    rt.accelerator.end_training()
    return run_dir


def _train_epoch(s: Session, stages: dict[str, Stage], epoch: int, step: int, steps: int) -> tuple[dict, int, float, int]:
    """One epoch; returns (per-step metric means, images seen by all ranks, seconds, global step)."""
    cfg, rt, task = s.cfg, s.rt, s.task
    guard = next(iter(stages.values())).guard  # shared by all stages
    task.train()
    meter = RunningMeans()
    if hasattr(s.train_loader, "set_epoch"):
        s.train_loader.set_epoch(epoch - 1)
    bar = tqdm(
        total=steps * cfg.data.batch_size,
        unit="img",
        unit_scale=True,
        desc=f"epoch {epoch}/{cfg.loop.epochs}",
        disable=not rt.is_main,
        dynamic_ncols=True,
        leave=False,
    )
    start = time.perf_counter()
    done = 0
    for x, y in s.train_loader:
        if done == steps:
            break
        for stage in stages.values():
            stage.set_step(step)
        guard.begin()
        meter.add(task.train_step(x, y, stages))
        guard.end()
        step += 1
        done += 1
        bar.update(cfg.data.batch_size)
        if done % cfg.loop.log_interval == 0:
            means = meter.means()  # host sync: only every log_interval steps
            bar.set_postfix(_postfix(means, done * cfg.data.batch_size / (time.perf_counter() - start)))
    means = meter.means()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    time_s = time.perf_counter() - start
    bar.close()
    return means, done * cfg.data.batch_size, time_s, step


def _info_dict(info: DatasetInfo) -> dict:
    return {"source": info.source, "root": str(info.root) if info.root else None, "num_classes": info.num_classes, "train_size": info.train_size, "val_size": info.val_size}
