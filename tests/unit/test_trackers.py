"""Experiment trackers without training: a missing package is one line naming the extra; the config as MLflow parameters."""

import sys

import pytest

from fastafd import cli, trackers


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
