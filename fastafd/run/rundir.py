"""The run directory: resolved config, environment record (git SHA, versions: :mod:`fastafd.run.env`) and metrics.jsonl."""

from __future__ import annotations

import datetime as dt
import json
import platform
import socket
import sys
from pathlib import Path

from fastafd.config import TrainConfig, to_dict
from fastafd.errors import UserError
from fastafd.run import atomic, readback
from fastafd.run.env import git_sha, versions

CONFIG_FILE = "config.json"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
TRACKERS_FILE = "trackers.json"
"""The W&B and MLflow run ids of the run and the last step each got (:mod:`fastafd.observe.trackers`): a resume continues them."""
SWEEP_MANIFEST = "sweep.json"
"""What makes a folder a sweep folder (:data:`fastafd.experiments.plan.MANIFEST`): a run never goes into one."""


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def check_out(out: Path | None, data_root: Path | None) -> None:
    """Refuse an ``--out`` that cannot be a run folder, before anything is built or written: a file, or
    the dataset folder or a folder inside it (the run's files would become part of the data: a new
    class folder, say)."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass a folder for the run (new or one to resume)")
    if (out / SWEEP_MANIFEST).exists():
        raise UserError(f"--out {out} is a sweep folder (it has {SWEEP_MANIFEST}), not a run folder: pass a folder of its own for the run, "
                        "e.g. --out runs/my-run (a sweep's cells are run by `fastafd sweep`)")
    if data_root is not None:
        o, d = out.resolve(), Path(data_root).resolve()
        if o == d or d in o.parents:
            raise UserError(f"--out {out} is inside the dataset folder {data_root}: its files would become part of the data; "
                            "pass a folder outside it, e.g. --out runs/my-run")


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (unique temporary file, fsync, rename: :mod:`fastafd.run.atomic`)."""
    atomic.write_text(path, json.dumps(obj, indent=2) + "\n")


def create(run_dir: Path, cfg: TrainConfig, extra: dict) -> None:
    """Create ``run_dir`` and record the resolved config and the environment (main process only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, to_dict(cfg))
    env = {
        "git_sha": git_sha(),
        "versions": versions(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        **extra,
    }
    write_json(run_dir / ENV_FILE, env)


SET_ASIDE = ("checkpoints", METRICS_FILE, "tensorboard", TRACKERS_FILE)
"""What ``checkpoint.resume=fresh`` moves out of the way: the earlier run's checkpoints, metrics, TensorBoard events and tracker run ids (new tracker runs start)."""


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's files (:data:`SET_ASIDE`) into ``run_dir/previous-<date>-<time>/``; nothing is
    deleted. Returns that folder (None: nothing to move)."""
    run_dir = Path(run_dir)
    present = [run_dir / name for name in SET_ASIDE if (run_dir / name).exists()]
    if not present:
        return None
    stamp = f"previous-{dt.datetime.now():%Y%m%d-%H%M%S}"
    dest, n = run_dir / stamp, 1
    while dest.exists():
        n += 1
        dest = run_dir / f"{stamp}-{n}"
    dest.mkdir()
    for path in present:
        path.rename(dest / path.name)
    return dest


def append_metrics(run_dir: Path, row: dict) -> None:
    append_jsonl(Path(run_dir) / METRICS_FILE, row)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` that are whole (:func:`fastafd.run.readback.metrics`); damaged lines are skipped
    (:func:`metrics_lines` names them). A missing or unreadable file is a one-line error."""
    return readback.metrics(Path(run_dir) / METRICS_FILE).rows


def metrics_lines(run_dir: Path) -> readback.Lines:
    """The rows of ``metrics.jsonl`` with the damaged lines named (``FILE:LINE: why``)."""
    return readback.metrics(Path(run_dir) / METRICS_FILE)


def truncate_metrics(run_dir: Path, before_epoch: int) -> None:
    """Drop metrics rows of epoch >= ``before_epoch`` (written by a run killed after its last checkpoint,
    or, with ``before_epoch=1``, before its first)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = []
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            epoch = readback.integer(readback.loads(raw.decode()), "epoch", 1, readback.MAX_EPOCH)
        except (ValueError, TypeError, AttributeError):
            keep.append(raw)  # a damaged line is kept as it is (readers skip and name it): nothing of the user's is dropped
            continue
        if epoch < before_epoch:
            keep.append(raw)
    atomic.replace(path, lambda tmp: tmp.write_bytes(b"".join(r + b"\n" for r in keep)))
