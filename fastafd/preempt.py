"""Stopping on request: Slurm's warning signal -> checkpoint -> requeue -> exit 0; SIGTERM -> checkpoint -> exit 143.

``slurm/train.sbatch`` asks Slurm for ``SIGUSR1`` some minutes before the time limit
(``--signal=USR1@SECONDS``, ``--requeue``). ``SIGTERM`` is what ``scancel``, Kubernetes, container
runtimes and torchrun's agent (when it stops its workers) send first, with a grace period before
SIGKILL (30 s for Kubernetes and torchrun by default). The handler only records the signal. The loop
asks :meth:`Preemption.should_stop` after every step when it is the only process (reading a Python
flag is free) and at its log points otherwise (every ``loop.log_interval`` steps, where it reads
metrics anyway: one all-reduce of the flag, so all ranks agree on the same stop step, and no extra
host sync per step), and at epoch ends. The trainer then writes a checkpoint (every rank takes part,
rank 0 writes) and stops:

* ``SIGUSR1``: rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` when under Slurm, and the process exits
  0; the requeued job starts again with the same job id, hence the same run directory, and resumes
  from its newest checkpoint. Outside Slurm the run just stops cleanly.
* ``SIGTERM``: one line saying where it stopped and that the same command resumes, exit code 143
  (128 + 15, the code of a terminated process, so that ``fastafd train && next`` does not go on).

The time from the signal to the checkpoint is at most one step (one process) or ``loop.log_interval``
steps (several processes), plus an evaluation when the signal lands in one, plus the checkpoint write.
The launcher (``launch/run.sh``) ignores SIGUSR1, so torchrun's agent survives it; the training
processes install their own handlers here.
"""

import os
import signal
import subprocess

import torch

from fastafd import dist

SIGNAL = signal.SIGUSR1
"""Slurm's warning before the time limit: checkpoint and requeue."""
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Handled, in increasing priority: a SIGTERM on any rank stops the run without requeueing it."""


class Preempted(Exception):
    """Raised by the loop after the stop checkpoint is written; ``train`` handles it."""

    def __init__(self, step: int, signum: int = SIGNAL, saved: bool = True) -> None:
        super().__init__(f"stopped at step {step} on {signal.Signals(signum).name}")
        self.step, self.signum, self.saved = step, signum, saved
        """``saved``: False when the stop checkpoint was withheld (a run of non-finite steps): resume goes back further."""


class Preemption:
    """The signal received (if any), and what to do once every rank agrees to stop."""

    def __init__(self, world_size: int = 1) -> None:
        self.requested: int | None = None
        self.world_size = world_size
        self._previous: dict[int, object] = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (an embedding application): no handler, never stopped
                pass

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested is None or SIGNALS.index(signum) > SIGNALS.index(self.requested):
            self.requested = signum

    @property
    def check_every_step(self) -> bool:
        """One process: the flag is a Python value, so it is read after every step (no sync, no agreement needed)."""
        return self.world_size == 1

    def should_stop(self, device: torch.device) -> int | None:
        """The signal to stop on, the same on every rank, if it reached any rank (several processes: one
        all-reduce, so call it at log points only)."""
        level = SIGNALS.index(self.requested) + 1 if self.requested is not None else 0
        if self.world_size > 1:
            level = round(dist.all_reduce_max(float(level), device))
        return SIGNALS[level - 1] if level else None

    def stop_line(self, step: int, signum: int, saved: bool) -> str:
        """The line for a run stopped by SIGTERM (rank 0 prints it)."""
        what = "checkpoint written" if saved else "no checkpoint (non-finite steps), the previous one is kept"
        return f"stopped at step {step} on {signal.Signals(signum).name}: {what}; run the same command to resume"

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
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
