"""Reliability through the real CLI: SIGKILL + resume is bitwise exact, corrupt checkpoints,
incompatible configs, non-finite losses (the export to plain timm: test_train_cli.py)."""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastafd.checkpoint import choice, paths

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train

TINY = [
    "--model.peers", "cifar_resnet8", "cifar_resnet8",
    "--data.batch_size", "16",
    "--loop.max_steps_per_epoch", "6",
    "--loop.epochs", "2",
    "--checkpoint.every_steps", "2",
    "--log.progress", "off",
    "--log.tensorboard", "off",
    "--system.deterministic",
]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory, fastafd_cli):
    return fastafd_cli.env(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def run_cli(fastafd_cli):
    """``run_cli(args, env, fault=None, check=True)``: ``fastafd ARGS``, with ``FASTAFD_FAULT=fault`` (then unchecked)."""
    return lambda args, env, fault=None, check=True: fastafd_cli.run(args, {**env, **({"FASTAFD_FAULT": fault} if fault else {})},
                                                             check=check and fault is None)


def final_weights(run: Path) -> dict:
    return load_file(str(paths.list_checkpoints(run)[0] / paths.MODEL))


LAYOUTS = {
    "nchw": [],
    "channels_last": ["--system.channels_last", "on"],
    # the multi-branch methods (two branches of cifar_resnet8 on a shared trunk; CL in channels-last)
    "one": ["--method.name", "one"],
    "cl_channels_last": ["--method.name", "cl", "--system.channels_last", "on"],
}
"""Memory formats of the peers: CPU's default, and the CUDA default (optimizer state must come back in it);
and the branch methods, killed once (cheaper: what they add is their state, not another resume path)."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory, env, run_cli):
    """The uninterrupted run of TINY in a memory format (made once per format)."""
    runs = {}

    def get(layout: str) -> Path:
        if layout not in runs:
            runs[layout] = tmp_path_factory.mktemp("runs") / f"straight-{layout}"
            run_cli(["train", "--out", str(runs[layout]), *TINY, *LAYOUTS[layout]], env)
        return runs[layout]

    return get


@pytest.fixture(scope="module")
def uninterrupted(straight):
    return straight("nchw")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_at_random_steps_and_mid_checkpoint_resumes_bitwise(layout, straight, tmp_path, env, run_cli):
    uninterrupted = straight(layout)
    seed = int(os.environ.get("FASTAFD_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    total = 12  # 2 epochs x 6 steps
    kill_steps = sorted(rng.sample(range(1, total), 2))
    faults = [f"kill@step={kill_steps[0]}", "kill@checkpoint=2", f"kill@step={kill_steps[1]}"]
    if layout not in ("nchw", "channels_last"):
        faults = [f"kill@step={kill_steps[1]}"]
    out = tmp_path / "killed"
    args = ["train", "--out", str(out), *TINY, *LAYOUTS[layout]]
    for fault in faults:
        proc = run_cli(args, env, fault=fault)
        assert proc.returncode == -9, (seed, fault, proc.returncode, proc.stderr[-2000:])  # really SIGKILLed
    proc = run_cli(args, env)
    assert "resuming from" in proc.stderr + proc.stdout
    a, b = final_weights(uninterrupted), final_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (seed, faults, key)
    # the metrics log has each epoch once, like the uninterrupted run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    straight = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [p["top1"] for p in rows[-1]["peers"]] == [p["top1"] for p in straight[-1]["peers"]]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path, env, run_cli):
    run = tmp_path / "corrupt"
    import shutil

    shutil.copytree(uninterrupted, run)
    newest = paths.list_checkpoints(run)[0]
    bad = newest / paths.MODEL
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = run_cli(["train", "--out", str(run), *TINY[:-1], "--loop.epochs", "3", "--system.deterministic"], env)
    text = proc.stderr + proc.stdout
    assert str(bad) in text and "skipping corrupt checkpoint" in text
    previous = paths.list_checkpoints(uninterrupted)[1]
    assert f"resuming from {run / 'checkpoints' / previous.name}" in text
    assert "loop.epochs: 2 -> 3" in text  # a deliberate change is allowed and reported
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_incompatible_config_is_refused_with_the_differences(uninterrupted, tmp_path, env, run_cli):
    import shutil

    run = tmp_path / "other"
    shutil.copytree(uninterrupted, run)
    args = [a if a != "cifar_resnet8" else "cifar_resnet14" for a in TINY]
    proc = run_cli(["train", "--out", str(run), *args, "--method.name", "dml"], env, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "cannot resume" in err
    assert "model.peers: ['cifar_resnet8', 'cifar_resnet8'] -> ['cifar_resnet14', 'cifar_resnet14']" in err
    assert "method.name: 'afd' -> 'dml'" in err


def test_non_finite_losses_stop_the_run_naming_step_and_term(uninterrupted, tmp_path, env, run_cli):
    """A good run (2 epochs) continued with a diverging learning rate: the run stops after 3 skipped
    steps, and the checkpoint it names is the last one before the skips (none is written during them)."""
    import shutil

    out = tmp_path / "diverge"
    shutil.copytree(uninterrupted, out)
    args = [*TINY, "--loop.epochs", "3", "--optim.lr", "1e15", "--loop.max_skipped_steps", "3", "--loop.log_interval", "1",
            "--checkpoint.every_steps", "1"]
    proc = run_cli(["train", "--out", str(out), *args], env, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("fastafd: error: 3 consecutive steps were skipped for non-finite losses (up to step ")
    assert "non-finite: " in line and "of peer 0 (cifar_resnet8)" in line
    kept = choice.latest_valid(out)  # the last good checkpoint is intact and loadable
    assert kept is not None and all(torch.isfinite(t).all() for t in kept.tensors(paths.MODEL).values())
    # ... and it precedes the run of skipped steps (none was written during it): the one the message names
    last_skipped = int(line.split("(up to step ")[1].split(")")[0])
    assert kept.step <= last_skipped - 3, (kept.step, last_skipped)
    assert f"The last good checkpoint, {kept.path}, is kept" in line
    assert "fastafd: warning: no checkpoint at step" in proc.stderr
    straight = load_file(str(paths.step_dir(uninterrupted, 12) / paths.MODEL))
    assert kept.step == 12 and all(torch.equal(v, straight[k]) for k, v in kept.tensors(paths.MODEL).items())
