"""The training loop: schedules, evaluation, metrics, checkpoints. It knows nothing about the method."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastafd import checkpoint, compile_cache, dist, faults, observe, preempt, rundir, runlock, state
from fastafd.config import TrainConfig, to_dict
from fastafd.data import DatasetInfo, build_data
from fastafd.errors import RunStopped, Stopped, UserError
from fastafd.evaluate import evaluate
from fastafd.methods import Numerics, Task, build_task
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
    if rt.device.type == "cuda":  # fixed shapes (the last partial batch is dropped): let cuDNN pick its kernels once
        torch.backends.cudnn.benchmark = not cfg.system.deterministic
    train_loader, val_loader, info = dist.local_main_first(rt, lambda: build_data(
        cfg.data, rank=rt.rank, world_size=rt.world_size, local_rank=rt.local_rank, device=rt.device, seed=cfg.system.seed,
        channels_last=rt.channels_last,
    ))
    if rt.is_main and (warning := small_batch_warning(cfg.data.batch_size, rt.world_size)):
        observe.warn(warning)
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


SMALL_BN_BATCH = 32
"""Below this many images per process, BatchNorm statistics (per process: peers, transfer layers and
discriminators) get noisy enough to cost accuracy."""


def small_batch_warning(global_batch: int, world_size: int) -> str | None:
    """A one-line warning when several processes leave each fewer than :data:`SMALL_BN_BATCH` images."""
    per_process = global_batch // world_size
    if world_size == 1 or per_process >= SMALL_BN_BATCH:
        return None
    return (f"{per_process} images per process ({global_batch} over {world_size} processes): BatchNorm statistics are "
            f"per process and get noisy below {SMALL_BN_BATCH}; raise --data.batch_size or use fewer processes")


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


def train(cfg: TrainConfig) -> Path | None:
    """Train ``cfg`` (continuing from a checkpoint when there is one); returns the run directory (None: dry run).

    The run folder is locked (rank 0, :mod:`fastafd.runlock`) from before its checkpoints are read
    until this returns or raises: one run per folder.
    """
    with contextlib.ExitStack() as held:
        return _train(cfg, held)


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> Path | None:
    started = time.perf_counter()
    rundir.check_out(cfg.out, cfg.data.root)  # before the data is built
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
        task, cfg, device=rt.device, dtype=rt.dtype, steps_per_epoch=steps_per_epoch,
        grad_sync=dist.all_reduce_grads if rt.world_size > 1 else None,
    )
    use_tensorboard = observe.tensorboard_enabled(cfg.log.tensorboard)  # UserError before anything is written
    if cfg.loop.dry_run:
        return _dry_run(s, stages, steps_per_epoch)
    run_dir = cfg.out or rundir.default_run_dir(cfg.recipe)
    held.enter_context(runlock.hold(run_dir, rank=rt.rank, world_size=rt.world_size))  # before anything is read or written
    if rt.compile:  # before the first compile: a requeued job finds its kernels in the run folder
        compile_cache.enable(cfg.system.compile_cache or run_dir / "compile_cache")
    meter = RunningMeans()
    pos, ckpt = _resume(cfg, s, stages, meter, run_dir)
    if rt.is_main:
        if cfg.checkpoint.resume == "fresh" and (aside := rundir.set_aside(run_dir)) is not None:
            observe.write(f"starting over in {run_dir}: the earlier checkpoints, metrics and TensorBoard files are in {aside}")
        extra = {"resumed_from": str(ckpt.path) if ckpt else None}
        rundir.create(run_dir, cfg, {"world_size": rt.world_size, "device": str(rt.device), "dataset": _info_dict(s.info), **extra})
        rundir.truncate_metrics(run_dir, before_epoch=pos.epoch)  # from scratch: rows of a run killed before its first checkpoint
    obs = _Observers(
        scalars=observe.Scalars(run_dir, task.names, to_dict(cfg), purge_step=pos.step if ckpt else None) if rt.is_main and use_tensorboard else None,
        profiler=observe.Profiler(cfg.log.profile, run_dir / observe.PROFILE_DIR, rank=rt.rank, device=rt.device, first_step=pos.step),
    )
    observe.set_nvtx(rt.device.type == "cuda")
    run = _Run(s, stages, run_dir, obs, steps_per_epoch, preempt.Preemption(rt.world_size), started)
    watch, first_epoch = dist.peer_watch(rt, cfg.system.peer_timeout_s), pos.epoch
    try:
        for epoch in range(pos.epoch, cfg.loop.epochs + 1):
            if epoch > first_epoch and (signum := run.preempt.should_stop(rt.device)):  # the last epoch's checkpoint is written
                raise preempt.Preempted(pos.step, signum, saved=True)
            means, images, time_s, step, data_wait = _train_epoch(run, epoch, pos, meter)
            pos = state.Position(epoch=epoch + 1, epoch_step=0, step=step)
            meter = RunningMeans()
            if epoch % cfg.loop.eval_interval and epoch != cfg.loop.epochs:
                run.save(pos, meter)
                continue
            with observe.trace_range("eval"):
                evals = evaluate(task, s.val_loader)
            row = _epoch_row(epoch, step, time_s, images, means, stages, evals, task.names)
            row["data_wait_frac"] = round(data_wait, 4)
            if rt.is_main:  # the row first: a run killed before the checkpoint below drops it on resume
                rundir.append_metrics(run_dir, row)
                if obs.scalars is not None:
                    obs.scalars.eval(step, row)
                observe.write(observe.epoch_summary(row, cfg.loop.epochs, means))
            run.save(pos, meter, metric=row["ensemble_top1"])
    except preempt.Preempted as stop:
        if stop.signum != preempt.SIGNAL:  # SIGTERM: stop here, exit 128 + 15
            raise Stopped(run.preempt.stop_line(stop.step, stop.signum, stop.saved), 128 + stop.signum) from None
        if rt.is_main:
            observe.write(run.preempt.requeue(stop.step))
    except BaseException as e:
        if watch is not None:
            why = watch.explain(e) if isinstance(e, Exception) and not isinstance(e, (UserError, RunStopped)) else None
            watch.close(failed=True)  # the other ranks exit at once instead of waiting for this one
            if why:
                raise RunStopped(why) from e  # a peer died: say which, instead of a transport error
        raise
    finally:
        run.preempt.close()
        if watch is not None:
            watch.close()
        obs.profiler.stop()
        if obs.scalars is not None:
            obs.scalars.close()
        observe.set_nvtx(False)
    rt.accelerator.wait_for_everyone()
    rt.accelerator.end_training()
    return run_dir


def _resume(cfg: TrainConfig, s: Session, stages: dict[str, Stage], meter: RunningMeans, run_dir: Path) -> tuple[state.Position, checkpoint.Checkpoint | None]:
    """Load the checkpoint that ``checkpoint.resume`` names (auto: the newest valid one in --out)."""
    start = state.Position(epoch=1, epoch_step=0, step=0)
    ckpt = checkpoint.resolve(cfg.checkpoint.resume, run_dir if cfg.out is not None else None)
    if ckpt is None:
        return start, None
    mid_epoch = int(ckpt.state["epoch_step"]) > 0
    refused, allowed = state.config_changes(ckpt.state["config"], to_dict(cfg), mid_epoch=mid_epoch)
    data_refused, data_allowed = state.data_changes(ckpt.state.get("data"), _info_dict(s.info), mid_epoch=mid_epoch)
    refused, allowed = refused + data_refused, allowed + data_allowed
    if refused:
        _, at_epoch_end = state.config_changes(ckpt.state["config"], to_dict(cfg))  # allowed if it were not mid-epoch
        hint = ""
        if mid_epoch and any(c in at_epoch_end or c.startswith(("dataset train_size", "dataset root", "dataset source")) for c in refused):
            hint = (
                f" {ckpt.path.name} is mid-epoch (epoch {ckpt.state['epoch']}, step {ckpt.state['epoch_step']} of it) and its saved "
                "reader position belongs to the old data: change the data at an epoch end (resume with the old settings until then, "
                "or pass an epoch-end checkpoint folder to --checkpoint.resume)."
            )
        raise UserError(
            f"cannot resume from {ckpt.path}: this run differs from it in {'; '.join(refused)}.{hint} "
            "Use the checkpoint's settings, or another --out to start a new run (or --checkpoint.resume fresh to start over in this folder)"
        )
    same_schedule = not any(c.startswith(("optim.", "adv_optim.", "loop.epochs", "loop.max_steps_per_epoch", "data.batch_size")) for c in allowed)
    rt = s.rt
    try:
        pos = state.restore(
            ckpt, s.task, stages, s.train_loader, meter, rank=rt.rank, world_size=rt.world_size, device=rt.device, same_schedule=same_schedule
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:  # state.json's values (not its shape, checked on load) do not fit
        raise UserError(
            f"cannot restore {ckpt.path} ({type(e).__name__}: {e}): its state.json does not fit this run (edited by hand?); "
            "resume from an older checkpoint (pass its folder to --checkpoint.resume) or start over with --checkpoint.resume fresh"
        ) from None
    if rt.is_main:
        changes = f"; changes: {'; '.join(allowed)}" if allowed else ""
        observe.write(f"resuming from {ckpt.path} at epoch {pos.epoch}, step {pos.step}{changes}")
    return pos, ckpt


@dataclass
class _Observers:
    """Rank 0's TensorBoard writer (None when off or on other ranks) and the profiler (every rank)."""

    scalars: observe.Scalars | None
    profiler: observe.Profiler


@dataclass
class _Run:
    """What the epoch loop needs besides the position."""

    s: Session
    stages: dict[str, Stage]
    run_dir: Path
    obs: _Observers
    steps_per_epoch: int
    preempt: preempt.Preemption
    started: float
    """perf_counter() when train() began: the first step reports the time to reach it (compile included)."""
    first_step_done: bool = False

    def first_step(self) -> None:
        """Record this process's time to its first finished step in startup.jsonl (rank 0; one sync, once)."""
        self.first_step_done = True
        if self.s.rt.device.type == "cuda":
            torch.cuda.synchronize(self.s.rt.device)
        if self.s.rt.is_main:
            rundir.append_jsonl(self.run_dir / "startup.jsonl", {
                "time_to_first_step_s": round(time.perf_counter() - self.started, 3),
                "compile": self.s.rt.compile, "world_size": self.s.rt.world_size,
            })  # fmt: skip

    @property
    def guard(self) -> StepGuard:
        return next(iter(self.stages.values())).guard  # shared by all stages

    def save(self, pos: state.Position, meter: RunningMeans, metric: float | None = None) -> bool:
        """Checkpoint (collective: every rank contributes its RNG and reader state; rank 0 writes); False if withheld.

        No checkpoint is written while a run of skipped steps is going on, nor with a non-finite weight
        (the same decision on every rank: the flag and the weights are the same everywhere). In the
        sequential order the first skipped iteration can already have applied its logit step before a
        later stage's loss turned non-finite, so every checkpoint on disk precedes such an iteration,
        and the newest one is always a good one to resume from.
        """
        s = self.s
        if (why := self._withhold()) is not None:
            if s.rt.is_main:
                observe.warn(f"no checkpoint at step {pos.step}: {why}; the newest checkpoint stays the last good one")
            return False
        with observe.trace_range("checkpoint"):
            dist.average_buffers(s.task)
            tensors, st = state.capture(s.task, self.stages, s.train_loader, meter, pos, to_dict(s.cfg), s.rt.device)
            st["data"] = _info_dict(s.info)  # a resume compares it with its own data (class count, training set)
            if s.rt.is_main:
                checkpoint.write(self.run_dir, pos.step, tensors, st, keep=s.cfg.checkpoint.keep, metric=metric)
            s.rt.accelerator.wait_for_everyone()
        return True

    def _withhold(self) -> str | None:
        """Why the state must not be saved now (host reads: checkpoint time only), or None."""
        streak = int(self.guard.streak)
        if streak:
            return f"the last {streak} step(s) were skipped for non-finite values"
        params = [p.detach() for p in self.s.task.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        return None if bool(finite) else "a weight is not finite"

    def check_finite(self, means: dict[str, list[float]], step: int) -> None:
        """Stop when too many consecutive steps were skipped (read at a log point, after its sync)."""
        longest = int(self.guard.longest_streak)
        if longest < self.s.cfg.loop.max_skipped_steps:
            return
        names = self.s.task.names
        terms = [
            f"{key} of peer {k} ({names[k]})" for key, values in means.items() for k, v in enumerate(values) if not math.isfinite(v) and k < len(names)
        ]
        last = checkpoint.list_checkpoints(self.run_dir)
        raise RunStopped(
            f"{longest} consecutive steps were skipped for non-finite losses (up to step {int(self.guard.longest_end)}); "
            f"non-finite: {', '.join(terms) or 'a loss term'}. The last good checkpoint, {last[0] if last else 'none yet'}, is kept; "
            "lower the learning rates or check the data, then resume"
        )


def _train_epoch(run: _Run, epoch: int, pos: state.Position, meter: RunningMeans) -> tuple[dict, int, float, int, float]:
    """One epoch (from ``pos.epoch_step`` when resuming inside it); returns (per-step metric means,
    images seen by all ranks, seconds, global step, data-wait fraction)."""
    s, stages, obs = run.s, run.stages, run.obs
    cfg, rt, task = s.cfg, s.rt, s.task
    guard, steps = run.guard, run.steps_per_epoch
    every = cfg.checkpoint.every_steps
    task.train()
    if hasattr(s.train_loader, "set_epoch"):
        s.train_loader.set_epoch(epoch - 1)
    batch = cfg.data.batch_size
    first = pos.epoch_step if epoch == pos.epoch else 0
    step = pos.step
    progress = observe.Progress(cfg.log.progress, enabled=rt.is_main, epoch=epoch, epochs=cfg.loop.epochs, steps=steps, batch=batch)
    clock, recent = observe.LoopClock(), observe.IntervalMeans()
    start = time.perf_counter()
    done = logged = first
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
        faults.point("step", step)
        if not run.first_step_done:
            run.first_step()
        obs.profiler.step()
        progress.update()
        at_log_point = done % cfg.loop.log_interval == 0
        if at_log_point:
            means = meter.means()  # host sync: only every log_interval steps
            data_wait += _log_interval(obs, progress, clock, recent, stages, means, step, done, done - logged, batch)
            logged = done
            run.check_finite(means, step)
        # one process: a Python flag, read every step; several: one all-reduce of it, at log points only
        if done < steps and (at_log_point or run.preempt.check_every_step) and (signum := run.preempt.should_stop(rt.device)):
            saved = run.save(state.Position(epoch=epoch, epoch_step=done, step=step), meter)
            raise preempt.Preempted(step, signum, saved)
        if every and step % every == 0 and done < steps:
            run.save(state.Position(epoch=epoch, epoch_step=done, step=step), meter)
    means = meter.means()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    time_s = time.perf_counter() - start
    if done > logged:  # the epoch's last, partial interval: its sync is paid anyway
        data_wait += _log_interval(obs, None, clock, recent, stages, means, step, done, done - logged, batch)
    else:
        data_wait += clock.wait  # the loader's end-of-epoch next()
    run.check_finite(means, step)
    progress.close()
    return means, (done - first) * batch, time_s, step, min(data_wait / time_s, 1.0)


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


def _dry_run(s: Session, stages: dict[str, Stage], steps_per_epoch: int) -> None:
    """Everything is built (process group, data, task, optimizers): say so on rank 0 and stop before the first step."""
    rt, cfg = s.rt, s.cfg
    if rt.is_main:
        backend = torch.distributed.get_backend() if rt.world_size > 1 else "none"
        parts = [f"{name} {type(st.optimizer).__name__} {sum(p.numel() for p in st.params):,} params lr {st.lr:g}" for name, st in stages.items()]
        observe.write(
            f"dry run: {rt.world_size} processes ({backend}, {rt.device.type}, {rt.dtype}), method {cfg.method.name}, "
            f"peers {' '.join(cfg.model.peers)}, {s.info.num_classes} classes, {s.info.train_size} train / {s.info.val_size} val images, "
            f"global batch {cfg.data.batch_size}, {steps_per_epoch} steps x {cfg.loop.epochs} epochs; stages: {'; '.join(parts)}. "
            "Nothing trained or written."
        )
    rt.accelerator.wait_for_everyone()
    rt.accelerator.end_training()
    return None


def _info_dict(info: DatasetInfo) -> dict:
    return {"source": info.source, "root": str(info.root) if info.root else None, "num_classes": info.num_classes, "train_size": info.train_size, "val_size": info.val_size}
