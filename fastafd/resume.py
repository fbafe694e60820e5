"""Continuing a run: which checkpoint, whether this run may continue from it, and loading it."""

from __future__ import annotations

from pathlib import Path

from fastafd import state
from fastafd.checkpoint import choice, store
from fastafd.config import OPTIMIZER_SLOTS, to_dict
from fastafd.errors import UserError
from fastafd.metrics import RunningMeans
from fastafd.observe import console
from fastafd.session import Session, dataset_record
from fastafd.steps import Stages


def resume(session: Session, stages: Stages, meter: RunningMeans, run_dir: Path) -> tuple[state.Position, store.Checkpoint | None]:
    """Load the checkpoint that ``checkpoint.resume`` names (auto: the newest valid one in --out) into the
    live run; returns where to continue and the checkpoint (None: from the start)."""
    cfg = session.config
    start = state.Position(epoch=1, epoch_step=0, step=0)
    ckpt = choice.resolve(cfg.checkpoint.resume, run_dir if cfg.out is not None else None)
    if ckpt is None:
        return start, None
    mid_epoch = int(ckpt.state["epoch_step"]) > 0
    refused, allowed = state.config_changes(ckpt.state["config"], to_dict(cfg), mid_epoch=mid_epoch)
    data_refused, data_allowed = state.data_changes(ckpt.state.get("data"), dataset_record(session.dataset), mid_epoch=mid_epoch)
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
    schedule_fields = tuple(f"{slot}." for slot in OPTIMIZER_SLOTS) + ("loop.epochs", "loop.max_steps_per_epoch", "data.batch_size")
    same_schedule = not any(c.startswith(schedule_fields) for c in allowed)
    runtime = session.runtime
    try:
        pos = state.restore(
            ckpt, session.task, stages, session.train_loader, meter, rank=runtime.rank, world_size=runtime.world_size,
            device=runtime.device, same_schedule=same_schedule,
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:  # state.json's values (not its shape, checked on load) do not fit
        raise UserError(
            f"cannot restore {ckpt.path} ({type(e).__name__}: {e}): its state.json does not fit this run (edited by hand?); "
            "resume from an older checkpoint (pass its folder to --checkpoint.resume) or start over with --checkpoint.resume fresh"
        ) from None
    if runtime.is_main:
        changes = f"; changes: {'; '.join(allowed)}" if allowed else ""
        saved_world = len(ckpt.state["ranks"])
        moved = ""
        if saved_world != runtime.world_size:
            moved = (f"; on {runtime.world_size} processes, written by {saved_world}: the epoch's remaining samples are split "
                     "among the new processes (each seen once), their random augmentation streams start afresh")
        console.write(f"resuming from {ckpt.path} at epoch {pos.epoch}, step {pos.step}{changes}{moved}")
    return pos, ckpt
