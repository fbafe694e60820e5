"""Preemption: Slurm's warning signal -> checkpoint -> requeue -> exit 0.

``slurm/train.sbatch`` asks Slurm for ``SIGUSR1`` some minutes before the time limit
(``--signal=USR1@SECONDS``, ``--requeue``). The handler only sets a flag. The training loop asks
:meth:`Preemption.should_stop` at its log points (every ``loop.log_interval`` steps, where it reads
metrics anyway) and at epoch ends: one all-reduce of the flag, so all ranks agree on the same stop
step, and no extra host sync per step. The trainer then writes a checkpoint (every rank takes part,
rank 0 writes), rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` when under Slurm, and the process
exits 0. The requeued job starts again with the same job id, hence the same run directory, and the
trainer resumes from its newest checkpoint. Outside Slurm the run just stops cleanly (resume it by
running the same command again).

The launcher (``launch/run.sh``) ignores the signal, so torchrun's agent survives it; the
training processes install their own handler here.
"""

from __future__ import annotations

import os
import signal
import subprocess

import torch

from fastafd import dist

SIGNAL = signal.SIGUSR1


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is written; ``train`` handles it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted at step {step}")
        self.step = step


class Preemption:
    """The flag set by the warning signal, and what to do once every rank agrees to stop."""

    def __init__(self) -> None:
        self.requested = False
        try:
            self._previous = signal.signal(SIGNAL, self._handle)
        except ValueError:  # not the main thread (an embedding application): no handler, never preempted
            self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank if the signal reached any rank (one all-reduce: call it at log points only)."""
        return dist.all_reduce_max_flag(self.requested, device)

    def requeue(self, step: int) -> str:
        """Requeue the Slurm job (rank 0 only calls this); returns one line for the log."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return f"stopped at step {step} on {SIGNAL.name}: checkpoint written; run the same command to resume"
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if proc.returncode:
            return (f"stopped at step {step} on {SIGNAL.name}: checkpoint written, but `scontrol requeue {job}` failed "
                    f"({proc.stderr.strip() or proc.returncode}): resubmit with the same --out to resume")
        return f"stopped at step {step} on {SIGNAL.name}: checkpoint written, Slurm job {job} requeued; it resumes from the checkpoint"

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(SIGNAL, self._previous)
