"""Experiment trackers without training: a missing package is one line naming the extra; the config as MLflow parameters."""

import json
import sys
import time

import pytest

from fastafd import cli
from fastafd.errors import UserError
from fastafd.observe import trackers


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--log.trackers", name])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"pip install 'fastafd[{name}]'" in err and f"--log.trackers {name}" in err
    assert not (tmp_path / "run").exists()


def test_flat_config_names_fields_by_their_options():
    assert trackers.flat({"optim": {"lr": 0.1, "milestones": [0.5, 0.75]}, "out": None}) == {
        "optim.lr": 0.1, "optim.milestones": "[0.5, 0.75]", "out": None}


def test_a_tracker_that_does_not_start_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker

    PartialState()

    def refuse(self):
        raise ConnectionError("API request to http://nowhere failed\nretries exhausted")

    monkeypatch.setattr(MLflowTracker, "start", refuse)
    with pytest.raises(UserError, match=r"^--log.trackers mlflow: the tracker did not start \(API request to http://nowhere failed\): "
                                        r"check MLFLOW_TRACKING_URI, or drop mlflow from --log.trackers$"):
        trackers.Trackers(["mlflow"], tmp_path, {}, project="p", resume_step=None)


@pytest.mark.parametrize(("kept", "after"), [(5, 5), (2, 4)])
def test_a_resumed_wandb_run_logs_the_steps_its_offline_file_lacks(kept, after, tmp_path, monkeypatch):
    """The killed run had handed steps 1..6 to W&B, which wrote 1..``kept`` to its file before the kill; the
    checkpoint is at step 4. The resumed run logs from the step after what W&B kept, or after the checkpoint."""
    wandb = pytest.importorskip("wandb")
    from accelerate import PartialState

    PartialState()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # W&B reads its mode once per process
    try:
        killed = wandb.init(project="p", id="abc123", dir=str(tmp_path), settings=wandb.Settings(console="off", quiet=True))
        for step in range(1, kept + 1):
            killed.log({"x": float(step)}, step=step)
        killed.finish()
        time.sleep(1.1)  # W&B names a run's folder offline-run-<start second>-<id>: a second start in the same second shares it
        assert trackers.wandb_offline_last_step(tmp_path / "wandb", "abc123") == kept
        (path,) = (tmp_path / "wandb").glob("offline-run-*-abc123/run-abc123.wandb")
        whole = [r.SerializeToString() for r in trackers.wandb_records(path)]
        cut = tmp_path / "cut.wandb"  # a file whose writer was killed mid-record: the records before the cut
        cut.write_bytes(path.read_bytes()[:-5])
        assert [r.SerializeToString() for r in trackers.wandb_records(cut)] == whole[:-1]
        (tmp_path / "trackers.json").write_text('{"wandb": {"id": "abc123", "last_step": 6}}')
        resumed = trackers.Trackers(["wandb"], tmp_path, {}, project="p", resume_step=4)
        assert resumed.after["wandb"] == after
        for step in range(5, 9):
            resumed.log({"x": float(step)}, step=step)
        resumed.close()
    finally:
        wandb.teardown()
    steps = [json.loads(item.value_json) for path in sorted((tmp_path / "wandb").glob("offline-run-*-abc123/run-abc123.wandb"))
             for record in trackers.wandb_records(path) if record.WhichOneof("record_type") == "history"
             for item in record.history.item if (item.key or "/".join(item.nested_key)) == "_step"]
    assert steps == [*range(1, kept + 1), *range(after + 1, 9)]  # no step twice; none missing that W&B could still get
