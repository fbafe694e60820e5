"""The command line: options from the dataclasses, recipes, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from fastafd import args, cli, recipes
from fastafd.config import TrainConfig


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_option_names_cover_nested_fields_and_bool_negations():
    names = args.option_names(TrainConfig)
    assert {"model.peers", "adv_optim.lr", "data.root", "loop.epochs", "out", "model.no_pretrained"} <= names
    assert "lr" not in names


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--optim.lrr", "3"], "unknown option --optim.lrr. did you mean --optim.lr"),
        (["--optimm.lr", "3"], "did you mean --optim.lr"),
        (["--loop.epochs", "abc"], "--loop.epochs"),
        (["--method.name", "kd"], "invalid choice 'kd'"),
        (["--loop.epochs", "0"], "loop.epochs=0 must be >= 1"),
        (["--system.wait_timeout_s", "inf"], "system.wait_timeout_s=inf must be a finite number of seconds > 0"),
        (["--method.name", "afd", "--model.peers", "resnet18"], "method afd distills between peers but model.peers has 1"),
        (["--recipe", "imagenet_resnet19_afd"], "unknown recipe 'imagenet_resnet19_afd': did you mean imagenet_resnet18_afd"),
        (["--recipe", "imagenet_resnet18_afd"], "pass --data DIR"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(args, needle, capsys, tmp_path):
    code, out, err = run_cli(["train", "--out", str(tmp_path / "run"), *args], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastafd: error: ")
    assert needle in lines[0]
    assert not (tmp_path / "run").exists()


def test_unknown_option_lists_valid_siblings(capsys):
    code, _, err = run_cli(["train", "--loop.epoch", "3"], capsys)
    assert code == 2
    import dataclasses

    from fastafd.config import LoopConfig

    fields = sorted(f.name for f in dataclasses.fields(LoopConfig))
    assert "epochs" in fields and f"valid options of --loop: {', '.join(fields)}." in err


def _folder(root, classes=("a", "b"), per_class=2, empty=None):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            if c == empty and split == "train":
                continue
            for i in range(per_class):
                Image.new("RGB", (16, 16), (i * 40, 10, 10)).save(d / f"{i}.JPEG")
    return root


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "train"),
        (lambda p: _folder(p / "ds", empty="b"), "b"),
    ],
)
def test_bad_data_folders_exit_2_and_write_nothing(make, needle, capsys, tmp_path):
    root = make(tmp_path)
    code, _, err = run_cli(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--data.batch_size", "2"], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("fastafd: error: ") and needle in err
    assert not (tmp_path / "run").exists()


def test_unknown_model_names_close_matches(capsys, tmp_path):
    root = _folder(tmp_path / "ds")
    code, _, err = run_cli(["train", "--data", str(root), "--model.peers", "resnet18", "resnt18", "--data.batch_size", "2", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "unknown model 'resnt18'" in err and "resnet18" in err
    assert not (tmp_path / "r").exists()


def test_recipes_command_lists_every_recipe(capsys):
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == list(recipes.RECIPES)


def test_unknown_command(capsys):
    code, _, err = run_cli(["trian"], capsys)
    assert code == 2 and "did you mean train" in err


def test_help_documents_every_field():
    out = subprocess.run([sys.executable, "-m", "fastafd.cli", "train", "--help"], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    assert out, "no help printed"
    for name in args.option_names(TrainConfig):
        if name.startswith(tuple(f"{g}.no_" for g in ("model", "data", "loop", "system", "optim", "adv_optim", "method"))):
            continue
        assert f"--{name}" in out, name


def test_no_traceback_through_the_console_script(tmp_path, fastafd_cli):
    proc = fastafd_cli.run(["train", "--data", tmp_path / "nope"], check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_every_recipe_constructs_and_round_trips_through_json():
    from fastafd.config import from_dict, to_dict

    for name in recipes.RECIPES:
        cfg = recipes.get(name)
        assert cfg.recipe == name
        assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_small_per_process_batch_warning_only_with_several_processes():
    from fastafd.session import small_batch_warning

    assert small_batch_warning(16, 1) is None  # one process: the batch the user asked for
    assert small_batch_warning(256, 8) is None  # 32 per process
    assert small_batch_warning(128, 8).startswith("16 images per process (128 over 8 processes)")
