"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow, through accelerate's tracker classes.

``--log.trackers`` names them (with ``tensorboard``, the writer of :mod:`fastafd.observe.tensorboard`). They get the
same scalars as TensorBoard (same tags, same global step) and the resolved config as hyper-parameters,
from rank 0 only, under the run folder's name. The tracker run ids are kept in ``<run>/trackers.json``
so that a resumed run continues the same tracker run; with them the last step handed to each tracker.

A run killed after its checkpoint had logged steps past it. Which of them a tracker kept depends on
the tracker, and the resumed run logs exactly the ones it lacks (a resume is exact: the values it logs
there are those the killed run logged):

- MLflow writes each call to its store before returning: the last step handed over (trackers.json) is
  the last step it has.
- W&B hands records to its service process, which writes them to the run's ``.wandb`` file every
  15 s and uploads them on its own schedule, so a SIGKILLed process loses its last records. Offline
  (``WANDB_MODE=offline``), the resumed run reads the last step the killed run's files hold (W&B's
  ``offline-run-*/run-<id>.wandb`` transaction logs, :func:`wandb_records`) and logs from the step
  after it, or after the checkpoint if W&B holds less than that. Online, it logs from the step after
  the checkpoint and W&B ignores the steps its server already has (a resumed W&B run continues from
  its last step). Steps up to the checkpoint that W&B lost cannot be logged again.

Settings come from each tracker's own environment variables: ``WANDB_MODE`` (``offline`` needs no
account), ``WANDB_ENTITY``, ``WANDB_API_KEY``; ``MLFLOW_TRACKING_URI`` (MLflow's default is
``sqlite:///mlflow.db`` in the current folder). ``log.project`` is the W&B project and MLflow experiment.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from fastafd.errors import UserError, require
from fastafd.run.rundir import TRACKERS_FILE, write_json

EXTERNAL = ("wandb", "mlflow")
"""The trackers of this module (``tensorboard`` is :class:`fastafd.observe.tensorboard.Scalars`' own writer)."""


def check(names: Iterable[str]) -> None:
    """Refuse a tracker whose package is missing, in one line naming the extra (before anything is written)."""
    for name in names:
        if name in EXTERNAL:
            require(name, name, f"{'W&B' if name == 'wandb' else 'MLflow'} logging (--log.trackers {name})",
                    f"drop {name} from --log.trackers")


def flat(config: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"optim.lr": 0.1, ...}``: MLflow's parameters (lists as text)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.dumps(value) if isinstance(value, list) else value
    return out


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records (``wandb_internal_pb2.Record``) of a W&B transaction log ``run-<id>.wandb``:
    W&B's LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header:
    CRC32, length, type FULL/FIRST/MIDDLE/LAST). A chunk cut short by a kill ends the records."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):
            return
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_offline() -> bool:
    """W&B's own verdict (``WANDB_MODE``, ``wandb offline``'s settings file) on whether runs are offline."""
    import wandb

    return wandb.setup().settings.mode in ("offline", "dryrun")


def wandb_offline_last_step(wandb_dir: Path, run_id: str) -> int:
    """The last history step the offline segments of W&B run ``run_id`` under ``wandb_dir`` hold (-1: none)."""
    last = -1
    for path in sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":  # type: ignore[attr-defined]
                for item in record.history.item:  # type: ignore[attr-defined]
                    if (item.key or "/".join(item.nested_key)) == "_step":
                        last = max(last, int(json.loads(item.value_json)))
    return last


class Trackers:
    """The external trackers of one run (create on rank 0 only). ``resume_step``: the global step of the
    checkpoint the run continues from, so the tracker runs recorded in trackers.json are continued; None:
    new tracker runs start."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: Mapping, *, project: str, resume_step: int | None) -> None:
        self.path = Path(run_dir) / TRACKERS_FILE
        saved = self._read() if resume_step is not None else {}
        self.state: dict[str, dict] = {}
        self.after: dict[str, int] = {}  # steps <= this were logged before the resume
        self.trackers: dict[str, object] = {}
        try:
            for name in names:
                if name not in EXTERNAL:
                    continue
                old = saved.get(name, {})
                self.after[name] = int(old.get("last_step", -1))
                if name == "wandb" and old.get("id") and resume_step is not None:  # what W&B kept, not what it was handed
                    kept = -1
                    if wandb_offline():
                        kept = wandb_offline_last_step(Path(run_dir) / "wandb", old["id"])
                    self.after[name] = min(self.after[name], max(kept, resume_step))
                try:
                    tracker = (self._wandb if name == "wandb" else self._mlflow)(Path(run_dir), config, project, old)
                except Exception as e:  # not logged in, no network, a tracking server that refuses: one line, not a traceback
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    hint = "log in (wandb login) or set WANDB_MODE=offline" if name == "wandb" else "check MLFLOW_TRACKING_URI"
                    raise UserError(f"--log.trackers {name}: the tracker did not start ({first}): {hint}, "
                                    f"or drop {name} from --log.trackers") from None
                self.trackers[name] = tracker
            write_json(self.path, self.state)
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _wandb(self, run_dir: Path, config: Mapping, project: str, old: Mapping) -> object:
        import wandb
        from accelerate.tracking import WandBTracker

        run_id = old.get("id") or secrets.token_hex(4)  # W&B run ids: letters, digits, - and _
        self.state["wandb"] = {"id": run_id, "last_step": self.after["wandb"]}
        tracker = WandBTracker(project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                               settings=wandb.Settings(console="off", quiet=True))
        tracker.start()
        tracker.store_init_configuration(dict(config))
        return tracker

    def _mlflow(self, run_dir: Path, config: Mapping, project: str, old: Mapping) -> object:
        from accelerate.tracking import MLflowTracker

        tracker = MLflowTracker(experiment_name=project, run_id=old.get("run_id"), run_name=run_dir.name)
        tracker.start()
        run_id = tracker.active_run.info.run_id
        self.state["mlflow"] = {"run_id": run_id, "last_step": self.after["mlflow"]}
        have = tracker.active_run.data.params  # a resumed run: MLflow refuses to change a logged parameter
        params = {k: v for k, v in flat(config).items() if k not in have}
        if params:
            tracker.store_init_configuration(params)
        return tracker

    def log(self, values: Mapping[str, float], step: int) -> None:
        """``values`` at global ``step`` to every tracker that has not had this step before the resume."""
        wrote = False
        for name, tracker in self.trackers.items():
            if step <= self.after[name]:
                continue
            tracker.log(dict(values), step=step)  # type: ignore[attr-defined]
            if step > self.state[name]["last_step"]:
                self.state[name]["last_step"] = step
                wrote = True
        if wrote:
            write_json(self.path, self.state)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.finish()  # type: ignore[attr-defined]
