"""TensorBoard scalars (and the same tags to the experiment trackers of :mod:`fastafd.observe.trackers`)."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fastafd.errors import UserError, require

TB_DIR = "tensorboard"
"""Run subfolder with the TensorBoard event files (``tensorboard --logdir RUN``)."""


def tensorboard_enabled(mode: str) -> bool:
    """``log.tensorboard``: on needs the package, auto uses it when installed, off never."""
    if mode == "off":
        return False
    installed = importlib.util.find_spec("tensorboard") is not None
    if mode == "on" and not installed:
        raise UserError("TensorBoard logging (--log.tensorboard on) needs the optional package tensorboard: "
                        "pip install 'fastafd[tensorboard]', or use --log.tensorboard off")
    return installed


def peer_labels(names: Sequence[str]) -> list[str]:
    """Tag suffix of each peer: ``peer<k>-<timm name>`` (unique even when all peers share a name)."""
    return [f"peer{k}-{name}" for k, name in enumerate(names)]


class Scalars:
    """The run's scalars (create it on rank 0 only), to TensorBoard and to the experiment trackers of
    :mod:`fastafd.observe.trackers` (``trackers``: an object with ``log(values, step)`` and ``close()``), the same
    tags everywhere. Tags: see :func:`train_tags`, :func:`eval_tags`."""

    def __init__(self, run_dir: Path, names: Sequence[str], config: dict | None = None, purge_step: int | None = None,
                 eval_keys: Sequence[str] = (), *, tensorboard: bool = True, trackers: object | None = None) -> None:
        self.eval_keys = ("top1", "top5", *eval_keys)  # eval_keys: the method's per-peer evaluation extras
        self.writer = None
        self.trackers = trackers
        if tensorboard:
            tb = require("torch.utils.tensorboard", "tensorboard", "TensorBoard logging", "use --log.tensorboard off", package="tensorboard")
            # purge_step: a resumed run hides the events a killed run wrote after its checkpoint
            self.writer = tb.SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR), purge_step=purge_step)
            if purge_step is not None:
                self._restart(purge_step)
            if config is not None:
                self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.peers = peer_labels(names)

    def _restart(self, step: int) -> None:
        """Mark a restart at ``step`` the way TensorBoard's Python reader understands it too (a SessionLog START
        event: events of earlier files at ``step`` or later are dropped). purge_step alone is honoured by the
        Rust data server and EventAccumulator, but ``tensorboard --load_fast=false`` (also its fallback where the
        Rust server is missing) showed the killed run's steps twice."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))  # type: ignore[union-attr]

    def _emit(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.trackers is not None:
            self.trackers.log(values, step)  # type: ignore[attr-defined]

    def train(self, step: int, means: Mapping[str, list[float]], lrs: Mapping[str, float], img_per_s: float, data_wait: float) -> None:
        """Interval means of the step metrics (per peer), the stages' learning rates, throughput."""
        values: dict[str, float] = {}
        for key, per_peer in means.items():
            if len(per_peer) == len(self.peers):
                for label, value in zip(self.peers, per_peer, strict=True):
                    values[f"train/{key}/{label}"] = value
        for stage, lr in lrs.items():
            values[f"lr/{stage}"] = lr
        values["perf/img_per_s"] = img_per_s
        values["perf/data_wait_frac"] = data_wait
        self._emit(values, step)

    def eval(self, step: int, row: Mapping) -> None:
        """Validation accuracy per peer and of the ensemble, and the method's per-peer extras (afd: d_real, d_fake)."""
        values: dict[str, float] = {}
        for label, peer in zip(self.peers, row["peers"], strict=True):
            for key in self.eval_keys:
                if key in peer:
                    values[f"val/{key}/{label}"] = peer[key]
        values["val/top1/ensemble"] = row["ensemble_top1"]
        values["val/top5/ensemble"] = row["ensemble_top5"]
        self._emit(values, step)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            if self.trackers is not None:
                self.trackers.close()  # type: ignore[attr-defined]


def train_tags(names: Sequence[str], metric_keys: Iterable[str], stages: Iterable[str]) -> set[str]:
    """The tags :meth:`Scalars.train` writes for these peers, step metrics and stages."""
    tags = {f"train/{k}/{p}" for k in metric_keys for p in peer_labels(names)}
    return tags | {f"lr/{s}" for s in stages} | {"perf/img_per_s", "perf/data_wait_frac"}


def eval_tags(names: Sequence[str], extras: Iterable[str] = ()) -> set[str]:
    """The tags :meth:`Scalars.eval` writes (``extras``: per-peer keys such as d_real, d_fake)."""
    keys = ("top1", "top5", *extras)
    return {f"val/{k}/{p}" for k in keys for p in peer_labels(names)} | {"val/top1/ensemble", "val/top5/ensemble"}
