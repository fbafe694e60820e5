"""The training loop: schedules, evaluation, metrics, checkpoints. It knows nothing about the method."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastafd import checkpoint, dist, observe, rundir
from fastafd.config import TrainConfig, to_dict
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
    use_tensorboard = observe.tensorboard_enabled(cfg.log.tensorboard)  # UserError before anything is written
    run_dir = cfg.out or rundir.default_run_dir(cfg.recipe)
    if rt.is_main:
        rundir.create(run_dir, cfg, {"world_size": rt.world_size, "device": str(rt.device), "dataset": _info_dict(s.info)})
    step = 0
    obs = _Observers(
        scalars=observe.Scalars(run_dir, task.names, to_dict(cfg)) if rt.is_main and use_tensorboard else None,
        profiler=observe.Profiler(cfg.log.profile, run_dir / observe.PROFILE_DIR, rank=rt.rank, device=rt.device, first_step=step),
    )
    observe.set_nvtx(rt.device.type == "cuda")
    try:
        for epoch in range(1, cfg.loop.epochs + 1):
            means, images, time_s, step, data_wait = _train_epoch(s, stages, epoch, step, steps_per_epoch, obs)
            if epoch % cfg.loop.eval_interval and epoch != cfg.loop.epochs:
                continue
            with observe.trace_range("eval"):
                evals = evaluate(task, s.val_loader)
            row = _epoch_row(epoch, step, time_s, images, means, stages, evals, task.names)
            row["data_wait_frac"] = round(data_wait, 4)
            if rt.is_main:
                rundir.append_metrics(run_dir, row)
                checkpoint.save_weights(run_dir / checkpoint.WEIGHTS, task, {"epoch": str(epoch), "step": str(step)})
                if obs.scalars is not None:
                    obs.scalars.eval(step, row)
                observe.write(observe.epoch_summary(row, cfg.loop.epochs, means))
    finally:
        obs.profiler.stop()
        if obs.scalars is not None:
            obs.scalars.close()
        observe.set_nvtx(False)
    rt.accelerator.wait_for_everyone()
    rt.accelerator.end_training()
    return run_dir


@dataclass
class _Observers:
    """Rank 0's TensorBoard writer (None when off or on other ranks) and the profiler (every rank)."""

    scalars: observe.Scalars | None
    profiler: observe.Profiler


def _train_epoch(s: Session, stages: dict[str, Stage], epoch: int, step: int, steps: int,
                 obs: _Observers) -> tuple[dict, int, float, int, float]:
    """One epoch; returns (per-step metric means, images seen by all ranks, seconds, global step, data-wait fraction)."""
    cfg, rt, task = s.cfg, s.rt, s.task
    guard = next(iter(stages.values())).guard  # shared by all stages
    task.train()
    meter = RunningMeans()
    if hasattr(s.train_loader, "set_epoch"):
        s.train_loader.set_epoch(epoch - 1)
    batch = cfg.data.batch_size
    progress = observe.Progress(cfg.log.progress, enabled=rt.is_main, epoch=epoch, epochs=cfg.loop.epochs, steps=steps, batch=batch)
    clock, recent = observe.LoopClock(), observe.IntervalMeans()
    start = time.perf_counter()
    done = logged = 0
    data_wait = 0.0
    for x, y in clock.batches(s.train_loader):  # times each next(): the data-wait fraction
        if done == steps:
            break
        for stage in stages.values():
            stage.set_step(step)
        with observe.trace_range("train_step"):
            guard.begin()
            meter.add(task.train_step(x, y, stages))
            guard.end()
        step += 1
        done += 1
        obs.profiler.step()
        progress.update()
        if done % cfg.loop.log_interval == 0:
            means = meter.means()  # host sync: only every log_interval steps
            data_wait += _log_interval(obs, progress, clock, recent, stages, means, step, done, done - logged, batch)
            logged = done
    means = meter.means()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    time_s = time.perf_counter() - start
    if done > logged:  # the epoch's last, partial interval: its sync is paid anyway
        data_wait += _log_interval(obs, None, clock, recent, stages, means, step, done, done - logged, batch)
    else:
        data_wait += clock.wait  # the loader's end-of-epoch next()
    progress.close()
    return means, done * batch, time_s, step, min(data_wait / time_s, 1.0)


def _log_interval(obs: _Observers, progress: observe.Progress | None, clock: observe.LoopClock, recent: observe.IntervalMeans,
                  stages: dict[str, Stage], means: dict, step: int, done: int, steps: int, batch: int) -> float:
    """Progress and TensorBoard at a log point, right after a host sync; returns the interval's seconds in next()."""
    seconds, wait = clock.lap()  # the interval ends at the sync, i.e. where the device work ends
    img_per_s, interval = steps * batch / seconds, recent.update(means, done)
    if progress is not None:
        progress.log(done, interval, img_per_s, wait)
    if obs.scalars is not None:
        obs.scalars.train(step, interval, {name: st.lr for name, st in stages.items()}, img_per_s, wait)
    return wait * seconds


def _info_dict(info: DatasetInfo) -> dict:
    return {"source": info.source, "root": str(info.root) if info.root else None, "num_classes": info.num_classes, "train_size": info.train_size, "val_size": info.val_size}
