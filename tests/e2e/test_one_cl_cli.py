"""ONE and CL through the real CLI on a CIFAR-100 layout: they train, report every branch and the ensemble,
and `fastafd export --peer k` writes trunk + branch k as the plain network, which the printed load line
builds with the logits the branch gives inside fastafd."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastafd.run import rundir
from tests.helpers import make_cifar

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train


@pytest.mark.parametrize("method, net, k", [("one", "cifar_resnet8", 3), ("cl", "resnet18", 2)])
def test_trains_on_a_cifar100_layout_and_a_branch_exports_to_plain_timm(method, net, k, tmp_path):
    import timm

    import fastafd.models.peers  # noqa: F401  (registers the CIFAR networks with timm)
    from fastafd import config
    from fastafd.checkpoint import choice, codec
    from fastafd.session import build_session

    make_cifar(tmp_path / "data", n_train=64, n_test=16)
    env = {**os.environ, "FASTAFD_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "fastafd.cli"]
    proc = subprocess.run([*cli, "train", "--out", str(out), "--method.name", method, "--model.peers", *[net] * k,
                           "--data.root", str(tmp_path / "data"), "--data.format", "cifar100", "--data.batch_size", "16",
                           "--loop.epochs", "1", "--loop.max_steps_per_epoch", "2", "--log.progress", "off"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rundir.read_metrics(out)
    assert len(row["peers"]) == k and "ensemble_top1" in row

    exported = tmp_path / "branch.safetensors"
    proc = subprocess.run([*cli, "export", str(out), "--peer", str(k - 1), "--out", str(exported)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["model"] == net and info["num_classes"] == 100
    *imports, expr = info["load"].split("; ")  # exactly the line users are told to run
    ns = {"timm": timm}
    exec("\n".join(imports), ns)
    model = eval(expr, ns).eval()

    os.environ["FASTAFD_CACHE"] = env["FASTAFD_CACHE"]
    session = build_session(config.from_dict(json.loads((out / "config.json").read_text())), train=False)
    codec.load_model(choice.latest_valid(out), session.task)
    task = session.task.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        inside = task.net.forward_branch(k - 1, task.net.forward_trunk(x))
        assert torch.equal(model(x), inside)
        other = task.net.forward_branch(0, task.net.forward_trunk(x))
        assert not torch.equal(model(x), other)  # it is branch k - 1, not another one
    session.runtime.accelerator.end_training()
