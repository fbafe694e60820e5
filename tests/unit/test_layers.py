"""Config and the run-folder tools are the bottom layer: they import without torch or timm
(``fastafd report`` reads run folders on a machine without torch; DESIGN.md, "Layers")."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

_NO_TORCH = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm"):
            raise ImportError(f"{name} is refused by the test")

sys.meta_path.insert(0, Refuse())
import fastafd.config, fastafd.run.rundir, fastafd.experiments.sweep, fastafd.experiments.report, fastafd.args
from fastafd.config import TrainConfig, from_dict, to_dict
cfg = from_dict(to_dict(TrainConfig()))
assert cfg.method.name == "afd"
assert not any(m.split(".")[0] in ("torch", "timm") for m in sys.modules), sorted(m for m in sys.modules if "torch" in m)
try:
    import torch  # noqa: F401
except ImportError:
    print("refused")
"""


def test_config_rundir_sweep_report_args_import_without_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "refused"  # the finder is active: a torch import would have failed above
