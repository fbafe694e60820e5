"""Evaluation: top-1/top-5 of every peer and of the ensemble, plus the method's extras."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from fastafd import config, dist
from fastafd.checkpoint import choice, codec
from fastafd.errors import UserError
from fastafd.methods import Task
from fastafd.metrics import summarize_eval
from fastafd.run import readback, rundir
from fastafd.session import build_session


@torch.no_grad()
def evaluate(task: Task, loader: object) -> dict:
    """Evaluate over the whole validation split (all ranks); BN statistics are averaged first."""
    dist.average_buffers(task)
    task.eval()
    sums: dict[str, torch.Tensor] = {}
    for x, y in loader:
        for key, value in task.eval_step(x, y).items():
            sums[key] = sums[key] + value if key in sums else value.clone()
    task.train()
    return summarize_eval(dist.all_reduce_sum(sums), task.names)


def evaluate_run(run: Path, *, data: Path | None = None, batch_size: int = 0, which: str = "best") -> dict:
    """Rebuild the run's task from its saved config, load the checkpoint ``which`` names (see
    :func:`fastafd.checkpoint.choice.choose`) and evaluate; the result names the checkpoint."""
    run = Path(run)
    cfg_path = run / rundir.CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a fastafd run directory (no {rundir.CONFIG_FILE}): pass the folder `fastafd train` printed")
    try:
        cfg = config.from_dict(readback.read_json(cfg_path))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{cfg_path} is not a fastafd config ({type(e).__name__}: {e}): pass the folder `fastafd train` printed") from None
    if data is not None:  # another dataset: its format is detected as `fastafd train --data` detects it
        cfg.data = replace(cfg.data, root=data, format="auto")
    if batch_size:
        cfg.data = replace(cfg.data, val_batch_size=batch_size)
    ckpt, why = choice.choose(run, which)
    session = build_session(cfg, train=False)  # the validation split only
    codec.load_model(ckpt, session.task)
    if session.runtime.is_main:
        print(f"fastafd: evaluating {ckpt.path} (step {ckpt.step}; {why})", file=sys.stderr)
    result = evaluate(session.task, session.val_loader)
    session.runtime.accelerator.end_training()
    return {"checkpoint": str(ckpt.path), "step": ckpt.step, "chosen": why, **result}
