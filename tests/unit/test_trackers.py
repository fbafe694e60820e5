"""Experiment trackers without training: a missing package is one line naming the extra; the config as MLflow parameters."""

import sys

import pytest

from fastafd import cli, trackers
from fastafd.errors import UserError


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
        trackers.Trackers(["mlflow"], tmp_path, {}, project="p", resumed=False)
