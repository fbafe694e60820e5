"""Config files: `fastafd train --config FILE` (YAML or JSON) under the command-line options, `--print-config`,
and one-line errors (exit 2, nothing written) for every kind of bad file."""

import json

import pytest
import yaml

from fastafd import cli, configfile, recipes
from fastafd.args import parse_train_args
from fastafd.config import from_dict, to_dict
from fastafd.experiments import plan, sweep


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_print_config_round_trips_through_config_exactly(tmp_path, capsys):
    code, out, err = run_cli(["train", "--recipe", "cifar100_resnet32_afd", "--data", "/d", "--optim.lr", "0.3", "--print-config"], capsys)
    assert code == 0 and not err
    assert not list(tmp_path.iterdir())
    (tmp_path / "my.yaml").write_text(out)
    want = parse_train_args(["--recipe", "cifar100_resnet32_afd", "--data", "/d", "--optim.lr", "0.3"])
    assert to_dict(parse_train_args(["--config", str(tmp_path / "my.yaml")])) == to_dict(want)
    # the printed YAML again, unchanged: a file read back prints as itself
    code, again, _ = run_cli(["train", "--config", str(tmp_path / "my.yaml"), "--print-config"], capsys)
    assert code == 0 and again == out


def test_config_json_of_a_run_works_as_is_and_options_apply_on_top(tmp_path):
    cfg = parse_train_args(["--recipe", "demo", "--loop.epochs", "3", "--system.seed", "7", "--out", "runs/a"])
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    assert to_dict(parse_train_args(["--config", str(tmp_path / "config.json")])) == to_dict(cfg)
    over = parse_train_args(["--config", str(tmp_path / "config.json"), "--loop.epochs", "5", "--out", "runs/b"])
    assert over.loop.epochs == 5 and str(over.out) == "runs/b" and over.system.seed == 7 and over.recipe == "demo"
    assert to_dict(from_dict(to_dict(over))) == to_dict(over)


def test_partial_yaml_sits_on_its_recipe_and_reads_yaml_spellings(tmp_path):
    (tmp_path / "c.yaml").write_text("recipe: cifar100_resnet32_afd\noptim:\n  lr: 1e-3\nsystem:\n  compile: off\n"
                                     "data:\n  root: /data/c100\n  scale: [0.5, 1]\nlog:\n  profile: [2, 4]\n")
    cfg = parse_train_args(["--config", str(tmp_path / "c.yaml")])
    base = recipes.get("cifar100_resnet32_afd")
    assert cfg.recipe == "cifar100_resnet32_afd" and cfg.loop.epochs == base.loop.epochs and cfg.model.peers == base.model.peers
    assert cfg.optim.lr == 1e-3 and cfg.system.compile == "off" and str(cfg.data.root) == "/data/c100"
    assert cfg.data.scale == (0.5, 1.0) and cfg.log.profile == (2, 4)
    assert parse_train_args(["--recipe", "demo", "--config", str(tmp_path / "c.yaml")]).model.peers == recipes.get("demo").model.peers


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("c.yaml", "optim:\n  lrr: 0.1\n", "c.yaml line 2: unknown key optim.lrr: did you mean optim.lr?"),
        ("c.yaml", "compile: on\n", "c.yaml line 1: unknown key compile: did you mean system.compile?"),
        ("c.yaml", "loop:\n  epochs: 3\noptim:\n  lr: fast\n", "c.yaml line 4: optim.lr must be a number, not 'fast'"),
        ("c.yaml", "system:\n  seed: 1.5\n", "c.yaml line 2: system.seed must be an integer, not 1.5"),
        ("c.yaml", "method:\n  name: nope\n", "c.yaml line 2: method.name must be one of"),
        ("c.yaml", "data:\n  scale: [0.1]\n", "c.yaml line 2: data.scale must be a list of 2 values"),
        ("c.yaml", "model:\n  pretrained: 1\n", "c.yaml line 2: model.pretrained must be true or false, not 1"),
        ("c.yaml", "optim: [1]\n", "c.yaml line 1: optim must be a mapping of its fields"),
        ("c.yaml", "a: b: c\n", "c.yaml line 1: not valid YAML"),
        ("c.yaml", "- 1\n", "c.yaml: the file must hold a mapping of config fields"),
        ("c.yaml", "loop:\n  epochs: 0\n", "c.yaml: loop.epochs=0 must be >= 1"),
        ("c.json", '{"optim": {"lr": 0.1,}}', "c.json line 1: not valid JSON"),
        ("c.json", '{\n "optim": {\n  "lr": 0.1,\n  "moment": 0.9\n }\n}', "c.json line 4: unknown key optim.moment: did you mean optim.momentum?"),
        (None, "", "no such file"),
    ],
)
def test_bad_config_files_are_one_line_exit_2_nothing_written(name, text, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / (name or "missing.yaml")
    if name:
        path.write_text(text)
    code, out, err = run_cli(["train", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastafd: error: --config ") and needle in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ([name] if name else [])  # no run folder, nothing beside the file


def test_sweep_cells_get_the_config_file_by_absolute_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("loop:\n  epochs: 2\n")
    cells = plan.plan_cells(["demo"], [0, 1], sweep._absolute_config(["--config", "s.yaml"]))
    assert [c.epochs for c in cells] == [2, 2]
    assert all(c.argv[-2:] == ("--config", str(tmp_path / "s.yaml")) for c in cells)
    code, out, _ = run_cli(["sweep", "--recipes", "demo", "--config", "s.yaml", "--dry_run"], capsys)
    assert code == 0 and f"--config {tmp_path / 's.yaml'}" in out
    code, _, err = run_cli(["sweep", "--recipes", "demo", "--dry_run", "--", "--print-config"], capsys)
    assert code == 2 and "--print-config prints one config" in err
    code, _, err = run_cli(["sweep", "--recipes", "demo", "--config", "nope.yaml"], capsys)
    assert code == 2 and "no such file" in err and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_dump_yaml_is_plain_yaml_in_field_order():
    text = configfile.dump_yaml(recipes.get("demo"))
    data = yaml.safe_load(text)
    assert list(data)[:3] == ["model", "method", "data"] and data["recipe"] == "demo"
