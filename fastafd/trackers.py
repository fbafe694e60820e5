"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow, through accelerate's tracker classes.

``--log.trackers`` names them (with ``tensorboard``, the writer of :mod:`fastafd.observe`). They get the
same scalars as TensorBoard (same tags, same global step) and the resolved config as hyper-parameters,
from rank 0 only, under the run folder's name. The tracker run ids are kept in ``<run>/trackers.json``
so that a resumed run continues the same tracker run; with them the last step each tracker got, so that
the steps a killed run logged after its checkpoint are not logged twice (a resume is exact: the values
the resumed run would log there are those already logged).

Settings come from each tracker's own environment variables: ``WANDB_MODE`` (``offline`` needs no
account), ``WANDB_ENTITY``, ``WANDB_API_KEY``; ``MLFLOW_TRACKING_URI`` (MLflow's default is
``sqlite:///mlflow.db`` in the current folder). ``log.project`` is the W&B project and MLflow experiment.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fastafd.errors import UserError
from fastafd.observe import require
from fastafd.rundir import TRACKERS_FILE, write_json

EXTERNAL = ("wandb", "mlflow")
"""The trackers of this module (``tensorboard`` is :class:`fastafd.observe.Scalars`' own writer)."""


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


class Trackers:
    """The external trackers of one run (create on rank 0 only). ``resumed``: the run continues from a
    checkpoint, so the tracker runs recorded in trackers.json are continued; otherwise new ones start."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: Mapping, *, project: str, resumed: bool) -> None:
        self.path = Path(run_dir) / TRACKERS_FILE
        saved = self._read() if resumed else {}
        self.state: dict[str, dict] = {}
        self.after: dict[str, int] = {}  # steps <= this were logged before the resume
        self.trackers: dict[str, object] = {}
        try:
            for name in names:
                if name not in EXTERNAL:
                    continue
                old = saved.get(name, {})
                self.after[name] = int(old.get("last_step", -1))
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
