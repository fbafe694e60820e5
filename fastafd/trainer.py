"""The training loop: schedules, evaluation, metrics, checkpoints. It knows nothing about the method.

What it knows of a method comes from the task class (:mod:`fastafd.methods.registry`): its stages,
the losses to display (``loss_keys``), its evaluation extras (``eval_keys``, ``describe_eval``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastafd import compile_cache, dist, faults, preempt, state
from fastafd.checkpoint import paths, store
from fastafd.comm import make_grad_sync
from fastafd.config import TrainConfig, to_dict
from fastafd.errors import RunStopped, Stopped, UserError
from fastafd.evaluate import evaluate
from fastafd.metrics import RunningMeans
from fastafd.observe import console, profile, tensorboard, trackers
from fastafd.observe.clock import IntervalMeans, LoopClock
from fastafd.optim import build_stages
from fastafd.resume import resume
from fastafd.run import rundir, runlock
from fastafd.session import Session, build_session, dataset_record
from fastafd.steps import Stages


def train(cfg: TrainConfig) -> Path | None:
    """Train ``cfg`` (continuing from a checkpoint when there is one); returns the run directory (None: dry run).

    The run folder is locked (rank 0, :mod:`fastafd.run.runlock`) from before its checkpoints are read
    until this returns or raises: one run per folder.
    """
    with contextlib.ExitStack() as held:
        return _train(cfg, held)


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> Path | None:
    started = time.perf_counter()
    rundir.check_out(cfg.out, cfg.data.root)  # before the data is built
    trackers.check(cfg.log.trackers)  # a missing wandb / mlflow package: one line before anything is built or written
    session = build_session(cfg)
    runtime, task = session.runtime, session.task
    steps_per_epoch = len(session.train_loader)  # >= 1: the loaders refuse a split smaller than one global batch
    if cfg.loop.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.loop.max_steps_per_epoch)
    stages = build_stages(
        task, cfg, device=runtime.device, dtype=runtime.dtype, steps_per_epoch=steps_per_epoch,
        grad_sync=make_grad_sync(runtime.world_size, overlap=cfg.system.overlap_comm, bucket_mb=cfg.system.bucket_mb,
                                 compression=cfg.system.grad_compression),
    )
    use_tensorboard = "tensorboard" in cfg.log.trackers and tensorboard.tensorboard_enabled(cfg.log.tensorboard)  # UserError before anything is written
    if cfg.loop.dry_run:
        return _dry_run(session, stages, steps_per_epoch)
    run_dir = cfg.out or rundir.default_run_dir(cfg.recipe)
    held.enter_context(runlock.hold(run_dir, rank=runtime.rank, world_size=runtime.world_size))  # before anything is read or written
    if runtime.compile:  # before the first compile: a requeued job finds its kernels in the run folder
        compile_cache.enable(cfg.system.compile_cache or run_dir / "compile_cache")
        task.compile(cfg.system.compile_scope)
    meter = RunningMeans()
    pos, ckpt = resume(session, stages, meter, run_dir)
    if runtime.is_main:
        if cfg.checkpoint.resume == "fresh" and (aside := rundir.set_aside(run_dir)) is not None:
            console.write(f"starting over in {run_dir}: the earlier checkpoints, metrics and TensorBoard files are in {aside}")
        extra = {"resumed_from": str(ckpt.path) if ckpt else None}
        rundir.create(run_dir, cfg, {"world_size": runtime.world_size, "device": str(runtime.device),
                                     "dataset": dataset_record(session.dataset), **extra})
        rundir.truncate_metrics(run_dir, before_epoch=pos.epoch)  # from scratch: rows of a run killed before its first checkpoint
    scalars = None
    if runtime.is_main and (use_tensorboard or set(cfg.log.trackers) & set(trackers.EXTERNAL)):
        external = None
        if set(cfg.log.trackers) & set(trackers.EXTERNAL):
            external = trackers.Trackers(cfg.log.trackers, run_dir, to_dict(cfg), project=cfg.log.project,
                                        resume_step=pos.step if ckpt else None)
        # purge from the step after the checkpoint's: the checkpoint's own step (its train and val points) was logged before it was written
        scalars = tensorboard.Scalars(run_dir, task.names, to_dict(cfg), purge_step=pos.step + 1 if ckpt else None, eval_keys=task.eval_keys,
                                  tensorboard=use_tensorboard, trackers=external)
    observers = _Observers(
        scalars=scalars,
        profiler=profile.Profiler(cfg.log.profile, run_dir / profile.PROFILE_DIR, rank=runtime.rank, device=runtime.device, first_step=pos.step),
    )
    profile.set_nvtx(runtime.device.type == "cuda")
    run = _Run(session, stages, run_dir, observers, steps_per_epoch, preempt.Preemption(runtime.world_size), started)
    # a rank that has not reached the loop when the others' first collective is about to time out is named
    watch = dist.peer_watch(runtime, cfg.system.peer_timeout_s, start_timeout_s=0.9 * cfg.system.dist_timeout_s)
    first_epoch = pos.epoch
    try:
        for epoch in range(pos.epoch, cfg.loop.epochs + 1):
            if epoch > first_epoch and (signum := run.preempt.should_stop(runtime.device)):  # the last epoch's checkpoint is written
                raise preempt.Preempted(pos.step, signum, saved=True)
            result = _train_epoch(run, epoch=epoch, pos=pos, meter=meter)
            pos = state.Position(epoch=epoch + 1, epoch_step=0, step=result.step)
            meter = RunningMeans()
            if epoch % cfg.loop.eval_interval and epoch != cfg.loop.epochs:
                run.save(pos, meter)
                continue
            with profile.trace_range("eval"):
                evals = evaluate(task, session.val_loader)
            row = _epoch_row(run, epoch=epoch, result=result, evals=evals)
            if runtime.is_main:  # the row first: a run killed before the checkpoint below drops it on resume
                rundir.append_metrics(run_dir, row)
                if observers.scalars is not None:
                    observers.scalars.eval(result.step, row)
                console.write(console.epoch_summary(row, cfg.loop.epochs, result.means, task.loss_keys, task.describe_eval(row["peers"])))
            run.save(pos, meter, metric=row["ensemble_top1"])
    except preempt.Preempted as stop:
        if stop.signum != preempt.SIGNAL:  # SIGTERM: stop here, exit 128 + 15
            raise Stopped(run.preempt.stop_line(stop.step, stop.signum, stop.saved), 128 + stop.signum) from None
        if runtime.is_main:
            console.write(run.preempt.requeue(stop.step))
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
        observers.profiler.stop()
        if observers.scalars is not None:
            observers.scalars.close()
        profile.set_nvtx(False)
    runtime.accelerator.wait_for_everyone()
    runtime.accelerator.end_training()
    return run_dir


@dataclass
class EpochResult:
    """What one training epoch hands to the evaluation and the metrics row."""

    means: dict[str, list[float]]
    """Per-step means of the task's metrics over the epoch (one value per peer)."""
    images: int
    """Training images of all ranks in this (part of the) epoch."""
    seconds: float
    step: int
    """Global step after the epoch."""
    data_wait: float
    """Fraction of the epoch's wall time rank 0 spent waiting for the loader."""


def _epoch_row(run: _Run, *, epoch: int, result: EpochResult, evals: dict) -> dict:
    """The ``metrics.jsonl`` row of an evaluated epoch."""
    names = run.session.task.names
    row = {"epoch": epoch, "step": result.step, "time_s": round(result.seconds, 3), "img_per_s": round(result.images / result.seconds, 2)}
    row.update({k: v for k, v in evals.items() if k != "peers"})
    peers = evals["peers"]
    for k, name in enumerate(names):
        peers[k].update({f"train_{key}": values[k] for key, values in result.means.items() if len(values) == len(names)})
        peers[k]["name"] = name
    row["peers"] = peers
    row["lr"] = run.stages.lrs
    row["skipped_steps"] = int(run.stages.guard.skipped)  # host read, once per epoch
    row["data_wait_frac"] = round(result.data_wait, 4)
    return row


@dataclass
class _Observers:
    """Rank 0's TensorBoard writer (None when off or on other ranks) and the profiler (every rank)."""

    scalars: tensorboard.Scalars | None
    profiler: profile.Profiler


@dataclass
class _Run:
    """What the epoch loop needs besides the position."""

    session: Session
    stages: Stages
    run_dir: Path
    observers: _Observers
    steps_per_epoch: int
    preempt: preempt.Preemption
    started: float
    """perf_counter() when train() began: the first step reports the time to reach it (compile included)."""
    first_step_done: bool = False
    eta_said: bool = False

    def say_eta(self, *, step: int, img_per_s: float) -> None:
        """Once, at the run's first log point: how long the rest should take at the rate just measured."""
        self.eta_said = True
        cfg = self.session.config
        left = (cfg.loop.epochs * self.steps_per_epoch - step) * cfg.data.batch_size
        if self.session.runtime.is_main and img_per_s > 0:
            seconds = left / img_per_s
            console.write(f"expected time: {console.duration(seconds)} for the {left:,} images left ({self.steps_per_epoch * cfg.data.batch_size:,} "
                          f"per epoch x {cfg.loop.epochs} epochs) at the {img_per_s:,.0f} img/s of the first {cfg.loop.log_interval} steps, "
                          "evaluations not counted")

    def first_step(self) -> None:
        """Record this process's time to its first finished step in startup.jsonl (rank 0; one sync, once)."""
        self.first_step_done = True
        runtime = self.session.runtime
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        if runtime.is_main:
            rundir.append_jsonl(self.run_dir / "startup.jsonl", {
                "time_to_first_step_s": round(time.perf_counter() - self.started, 3),
                "compile": runtime.compile, "world_size": runtime.world_size,
            })  # fmt: skip

    def save(self, pos: state.Position, meter: RunningMeans, metric: float | None = None) -> bool:
        """Checkpoint (collective: every rank contributes its RNG and reader state; rank 0 writes); False if withheld.

        No checkpoint is written while a run of skipped steps is going on, nor with a non-finite weight
        (the same decision on every rank: the flag and the weights are the same everywhere). In the
        sequential order the first skipped iteration can already have applied its logit step before a
        later stage's loss turned non-finite, so every checkpoint on disk precedes such an iteration,
        and the newest one is always a good one to resume from.
        """
        session, runtime = self.session, self.session.runtime
        if (why := self._withhold()) is not None:
            if runtime.is_main:
                console.warn(f"no checkpoint at step {pos.step}: {why}; the newest checkpoint stays the last good one")
            return False
        with profile.trace_range("checkpoint"):
            dist.average_buffers(session.task)
            tensors, saved = state.capture(session.task, self.stages, session.train_loader, meter, pos, to_dict(session.config), runtime.device)
            saved["data"] = dataset_record(session.dataset)  # a resume compares it with its own data (class count, training set)
            dist.rank0_first(runtime, lambda: store.write(self.run_dir, pos.step, tensors, saved, keep=session.config.checkpoint.keep,
                                                               metric=metric),
                             what=f"write the checkpoint of step {pos.step}", timeout_s=session.config.system.wait_timeout_s)
        return True

    def _withhold(self) -> str | None:
        """Why the state must not be saved now (host reads: checkpoint time only), or None."""
        streak = int(self.stages.guard.streak)
        if streak:
            return f"the last {streak} step(s) were skipped for non-finite values"
        params = [p.detach() for p in self.session.task.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        return None if bool(finite) else "a weight is not finite"

    def check_finite(self, means: dict[str, list[float]]) -> None:
        """Stop when too many consecutive steps were skipped (read at a log point, after its sync)."""
        guard = self.stages.guard
        longest = int(guard.longest_streak)
        if longest < self.session.config.loop.max_skipped_steps:
            return
        names = self.session.task.names
        terms = [
            f"{key} of peer {k} ({names[k]})" for key, values in means.items() for k, v in enumerate(values) if not math.isfinite(v) and k < len(names)
        ]
        last = paths.list_checkpoints(self.run_dir)
        raise RunStopped(
            f"{longest} consecutive steps were skipped for non-finite losses (up to step {int(guard.longest_end)}); "
            f"non-finite: {', '.join(terms) or 'a loss term'}. The last good checkpoint, {last[0] if last else 'none yet'}, is kept; "
            "lower the learning rates or check the data, then resume"
        )


def _train_epoch(run: _Run, *, epoch: int, pos: state.Position, meter: RunningMeans) -> EpochResult:
    """One epoch (from ``pos.epoch_step`` when resuming inside it)."""
    session, stages, observers = run.session, run.stages, run.observers
    cfg, runtime, task = session.config, session.runtime, session.task
    steps = run.steps_per_epoch
    every = cfg.checkpoint.every_steps
    task.train()
    session.train_loader.set_epoch(epoch - 1)
    batch = cfg.data.batch_size
    first = pos.epoch_step if epoch == pos.epoch else 0
    step = pos.step
    progress = console.Progress(cfg.log.progress, enabled=runtime.is_main, epoch=epoch, epochs=cfg.loop.epochs, steps=steps, batch=batch,
                                loss_keys=task.loss_keys)
    clock, recent = LoopClock(), IntervalMeans()
    start = time.perf_counter()
    done = logged = first
    data_wait = 0.0
    for x, y in clock.batches(session.train_loader):  # times each next(): the data-wait fraction
        if done == steps:
            break
        stages.set_step(step)
        with profile.trace_range("train_step"), stages.iteration():
            meter.add(task.train_step(x, y, stages))
        step += 1
        done += 1
        faults.point("step", step)
        if not run.first_step_done:
            run.first_step()
        observers.profiler.step()
        progress.update()
        at_log_point = done % cfg.loop.log_interval == 0
        if at_log_point:
            means = meter.means()  # host sync: only every log_interval steps
            wait, img_per_s = _log_interval(observers, stages, progress=progress, clock=clock, recent=recent, means=means, step=step,
                                            done=done, steps=done - logged, batch=batch)
            data_wait += wait
            logged = done
            if not run.eta_said:
                run.say_eta(step=step, img_per_s=img_per_s)
            run.check_finite(means)
        # one process: a Python flag, read every step; several: one all-reduce of it, at log points only
        if done < steps and (at_log_point or run.preempt.check_every_step) and (signum := run.preempt.should_stop(runtime.device)):
            saved = run.save(state.Position(epoch=epoch, epoch_step=done, step=step), meter)
            raise preempt.Preempted(step, signum, saved)
        if every and step % every == 0 and done < steps:
            run.save(state.Position(epoch=epoch, epoch_step=done, step=step), meter)
    means = meter.means()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    seconds = time.perf_counter() - start
    if done > logged:  # the epoch's last, partial interval: its sync is paid anyway
        data_wait += _log_interval(observers, stages, progress=None, clock=clock, recent=recent, means=means, step=step,
                                   done=done, steps=done - logged, batch=batch)[0]
    else:
        data_wait += clock.wait  # the loader's end-of-epoch next()
    run.check_finite(means)
    progress.close()
    return EpochResult(means=means, images=(done - first) * batch, seconds=seconds, step=step, data_wait=min(data_wait / seconds, 1.0))


def _log_interval(observers: _Observers, stages: Stages, *, progress: console.Progress | None, clock: LoopClock,
                  recent: IntervalMeans, means: dict, step: int, done: int, steps: int, batch: int) -> tuple[float, float]:
    """Progress and TensorBoard at a log point, right after a host sync; returns (the interval's seconds in
    next(), its img/s)."""
    seconds, wait = clock.lap()  # the interval ends at the sync, i.e. where the device work ends
    img_per_s, interval = steps * batch / seconds, recent.update(means, done)
    if progress is not None:
        progress.log(done, interval, img_per_s, wait)
    if observers.scalars is not None:
        observers.scalars.train(step, interval, stages.lrs, img_per_s, wait)
    return wait * seconds, img_per_s


def _dry_run(session: Session, stages: Stages, steps_per_epoch: int) -> None:
    """Everything is built (process group, data, task, optimizers): say so on rank 0 and stop before the first step."""
    runtime, cfg, dataset = session.runtime, session.config, session.dataset
    if runtime.is_main:
        backend = torch.distributed.get_backend() if runtime.world_size > 1 else "none"
        parts = [f"{name} {type(stage.optimizer).__name__} {sum(p.numel() for p in stage.params):,} params lr {stage.lr:g}"
                 for name, stage in stages.items()]
        console.write(
            f"dry run: {runtime.world_size} processes ({backend}, {runtime.device.type}, {runtime.dtype}), method {cfg.method.name}, "
            f"peers {' '.join(cfg.model.peers)}, {dataset.num_classes} classes, {dataset.train_size} train / {dataset.val_size} val images, "
            f"global batch {cfg.data.batch_size}, {steps_per_epoch} steps x {cfg.loop.epochs} epochs; stages: {'; '.join(parts)}. "
            "Nothing trained or written."
        )
    runtime.accelerator.wait_for_everyone()
    runtime.accelerator.end_training()
    return None
