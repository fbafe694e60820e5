"""A run started from another run's saved config.json (`fastafd train --config RUN/config.json`) has that run's config."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train

FASTAFD = shutil.which("fastafd") or ""
TINY = ["--model.peers", "cifar_resnet8", "cifar_resnet8", "--data.format", "synthetic", "--data.synthetic_classes", "10",
        "--data.image_size", "32", "--data.batch_size", "8", "--data.synthetic_samples", "64", "--loop.epochs", "1",
        "--loop.max_steps_per_epoch", "2", "--system.seed", "3", "--optim.lr", "0.02", "--log.progress", "off"]


def fastafd(*args, env):
    cmd = [FASTAFD or sys.executable, *([] if FASTAFD else ["-m", "fastafd.cli"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_a_run_from_a_saved_config_json_has_the_same_config(tmp_path):
    env = {**os.environ, "FASTAFD_CACHE": str(tmp_path / "cache")}
    first = fastafd("train", "--recipe", "demo_resnet8_dml", "--out", str(tmp_path / "a"), *TINY, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = fastafd("train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (json.loads((tmp_path / run / "config.json").read_text()) for run in ("a", "b"))
    assert a["recipe"] == "demo_resnet8_dml" and a["method"]["name"] == "dml" and a["system"]["seed"] == 3
    assert a.pop("out") == str(tmp_path / "a") and b.pop("out") == str(tmp_path / "b")
    assert b == a
