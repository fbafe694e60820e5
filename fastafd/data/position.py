"""Where a training loader is within its epochs, and the resume state every training loader shares.

The position of an epoch is **global**: the number of training steps done, each step one global batch
of ``data.batch_size`` samples over all ranks. Every training loader lays out epoch ``e`` as one
global sequence of samples (a function of the seed and ``e`` alone) and gives global step ``j``'s
samples ``[j G, (j + 1) G)`` (``G`` = the global batch) to the ranks in rank order, ``G / W`` each.
So the samples consumed after ``j`` steps are the first ``j G`` of the epoch whatever the number of
processes, and a run can continue on another number of processes: each new rank takes its share of
the remaining steps. What is exact where (docs/checkpoints.md):

* same processes: everything, bitwise (the loader's own random state, e.g. DALI's pipeline
  checkpoint, is restored too);
* another number of processes: every sample of the epoch exactly once (folders, CIFAR-100); the
  random augmentation draws of DALI (random-resized crops, flips of the folder and shard readers)
  come from fresh per-rank streams, since one rank's stream cannot be split into several; shards
  also lose their shuffle buffer (see :mod:`fastafd.data.dali`);
* another global batch mid-epoch: refused (the position counts global batches).

:class:`EpochPosition` is the bookkeeping (which epoch ``iter()`` gives next, how far the active one
got, a loaded state not yet applied) that the folder, shard, CIFAR-100 and synthetic training
loaders share; :func:`state` / :func:`check` are their ``state_dict`` format.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastafd.errors import UserError

VERSION = 3
"""3: the position is global (steps of the epoch); 2 and before were per rank and cannot be resumed."""


@dataclass
class Resume:
    """A loaded position not yet applied: epoch, global steps done, and whether the loader's own random
    state (``checkpoint``) belongs to this rank (same processes) or must start afresh."""

    epoch: int
    step: int
    checkpoint: str | None


class EpochPosition:
    """The epoch the next ``iter()`` produces, the step the active epoch reached, and a pending resume."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps = steps_per_epoch
        self.epoch = 0
        self.active: int | None = None
        self.done = 0
        """Global steps of the active epoch handed out (this rank's batches = steps)."""
        self.resume: Resume | None = None

    def set_epoch(self, epoch: int) -> None:
        """Announce the epoch of the next ``iter()``; a later epoch than a loaded position drops it (that
        epoch was cut short on purpose)."""
        if self.resume is not None and epoch > self.resume.epoch:
            self.resume = None
        elif self.resume is not None and epoch < self.resume.epoch:
            raise ValueError(f"set_epoch({epoch}) before the restored position (epoch {self.resume.epoch})")
        self.epoch = epoch

    def begin(self) -> tuple[int, int, str | None]:
        """Start iterating: (epoch, first global step, this rank's saved random state or None)."""
        epoch, start, checkpoint = self.epoch, 0, None
        if self.resume is not None and self.resume.epoch == epoch:
            start, checkpoint = self.resume.step, self.resume.checkpoint
        self.resume = None
        self.active, self.done = epoch, start
        return epoch, start, checkpoint

    def advance(self, step: int) -> None:
        """Global step ``step`` (0-based) was handed out."""
        self.done = step + 1

    def end(self) -> None:
        """The active epoch was iterated to its end: the next ``iter()`` gives the next one."""
        self.epoch = (self.active if self.active is not None else self.epoch) + 1
        self.active = None

    def mid_epoch(self) -> bool:
        return self.active is not None and 0 < self.done < self.steps

    def saved(self) -> tuple[int, int]:
        """(epoch, global steps done) to save now."""
        if self.resume is not None:
            return self.resume.epoch, self.resume.step
        if self.active is not None:
            return (self.active + 1, 0) if self.done >= self.steps else (self.active, self.done)
        return self.epoch, 0

    def load(self, resume: Resume) -> None:
        self.epoch = resume.epoch
        self.resume = resume if resume.step else None


def state(kind: str, *, seed: int, global_batch: int, rank: int, world_size: int, epoch: int, step: int,
          checkpoint: str | None = None) -> dict:
    """A training loader's ``state_dict``: JSON-ready, the global position plus this rank's random state."""
    return {"version": VERSION, "kind": kind, "seed": seed, "global_batch": global_batch, "epoch": epoch, "step": step,
            "rank": rank, "world_size": world_size, "checkpoint": checkpoint}


def check(saved: dict, *, kind: str, seed: int, global_batch: int, rank: int, world_size: int) -> Resume:
    """The position to continue from, or a one-line refusal. ``checkpoint`` is kept only when ``saved``
    is this very rank's state (same rank and number of processes)."""
    if saved.get("version") != VERSION:
        raise UserError(f"the data position in this checkpoint has format {saved.get('version')}, this fastafd reads {VERSION}: "
                        "resume with the fastafd that wrote it, or continue from an epoch-end checkpoint")
    want = {"kind": kind, "seed": seed, "global_batch": global_batch}
    diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
    if diff and int(saved.get("step") or 0):
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise UserError(f"cannot resume the data position mid-epoch: {what} changed since the checkpoint; "
                        "resume with the same data, seed and global batch (data.batch_size), or from an epoch-end checkpoint")
    own = saved.get("rank") == rank and saved.get("world_size") == world_size
    return Resume(epoch=int(saved["epoch"]), step=int(saved.get("step") or 0), checkpoint=saved.get("checkpoint") if own else None)


def rank_positions(steps: range, rank: int, world_size: int, batch: int) -> list[int]:
    """Positions in the epoch's global sequence that rank ``rank`` reads for global ``steps``, in order."""
    out: list[int] = []
    global_batch = batch * world_size
    for j in steps:
        first = j * global_batch + rank * batch
        out.extend(range(first, first + batch))
    return out
