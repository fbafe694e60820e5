"""A method defined outside fastafd, in a temporary module named by an entry point (``fastafd.methods``), is seen
everywhere a method is chosen or shown: ``fastafd methods``, ``train --help``, the recipes, a sweep's plan and a
report, with no file of fastafd changed (DESIGN.md: "a new method is one file plus one registration")."""

import json
import re
import subprocess
import sys
import textwrap

PLUGIN = '''
from fastafd.methods.dml import DML
from fastafd.methods.registry import register


@register
class PlugTest(DML):
    """DML under another name, registered from outside fastafd."""

    method = "plugtest"
    summary = "a method from a temporary module (tests/e2e/test_plugin.py)"
'''

TINY = ["--data.format", "synthetic", "--data.synthetic_samples", "64", "--data.batch_size", "16", "--loop.epochs", "1"]

SCRIPT = '''
import contextlib, io, json, sys
from pathlib import Path
from fastafd import args, cli
from fastafd.run import rundir
from fastafd.config import to_dict

tmp, tiny = Path(sys.argv[1]), sys.argv[2:]
out = {}
for name, argv in (("methods", ["methods"]), ("help", ["train", "--help"]), ("recipes", ["recipes"]),
                   ("sweep", ["sweep", "--recipes", "demo_resnet8_plugtest", "--seeds", "0", "--out", str(tmp / "sweep"), "--dry_run",
                              "--", *tiny])):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # --help
            code = e.code or 0
    out[name] = (code, buf.getvalue())
run = tmp / "runs" / "a"
run.mkdir(parents=True)
cfg = args.parse_train_args(["--recipe", "demo_resnet8_resnet20_plugtest", *tiny])
(run / rundir.CONFIG_FILE).write_text(json.dumps(to_dict(cfg)))
(run / rundir.METRICS_FILE).write_text(json.dumps({"epoch": 1, "step": 4, "ensemble_top1": 52,
    "peers": [{"name": "cifar_resnet8", "top1": 50}, {"name": "cifar_resnet20", "top1": 51}]}) + "\\n")
with contextlib.redirect_stdout(io.StringIO()):
    out["report"] = (cli.main(["report", str(tmp / "runs"), "--png", "off"]), "")
print(json.dumps(out))
'''


def test_a_method_registered_from_a_temporary_module_is_seen_by_every_command(tmp_path, fastafd_cli):
    site = tmp_path / "site"
    (site / "plugmethod-0.1.dist-info").mkdir(parents=True)
    (site / "plugmethod.py").write_text(textwrap.dedent(PLUGIN))
    (site / "plugmethod-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: plugmethod\nVersion: 0.1\n")
    (site / "plugmethod-0.1.dist-info" / "entry_points.txt").write_text("[fastafd.methods]\nplugtest = plugmethod\n")
    env = fastafd_cli.env(tmp_path / "cache", COLUMNS=200)
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *TINY], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {k: tuple(v) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}
    assert all(code == 0 for code, _ in out.values()), out
    assert any(line.startswith("plugtest ") and "a method from a temporary module" in line for line in out["methods"][1].splitlines())
    assert re.search(r"--method\.name\{[^}]*plugtest[,}]", re.sub(r"[\s│]+", "", out["help"][1]))  # a choice of --method.name
    assert "demo_resnet8_plugtest" in out["recipes"][1] and "cifar100_resnet32_plugtest" in out["recipes"][1]
    assert "demo_resnet8_plugtest-seed0" in out["sweep"][1]
    rows = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())["tables"][0]["rows"]
    assert [r["method"] for r in rows] == ["plugtest"]
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing

