"""End to end through the real `fastafd` console script on the built-in demo data."""

import json
import os
from pathlib import Path

import pytest

from fastafd.run import rundir

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train

@pytest.fixture(scope="module")
def afd_run(tmp_path_factory, fastafd_cli):
    env = fastafd_cli.env(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("runs") / "demo-afd"
    proc = fastafd_cli.run(["train", "--out", out, "--loop.epochs", "3"], env, timeout=1500)  # generous: a busy machine is 10x slower
    return out, env, proc


def test_demo_afd_learns_well_above_chance(afd_run):
    out, _, proc = afd_run
    rows = rundir.read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    last = rows[-1]
    assert {"epoch", "time_s", "img_per_s", "peers", "ensemble_top1"} <= set(last)
    assert len(last["peers"]) == 2
    for peer in last["peers"]:
        assert peer["top1"] > 35.0, peer  # 10 classes: chance is 10 %
        assert peer["top5"] >= peer["top1"]
        assert 0.0 <= peer["d_real"] <= 1.0 and 0.0 <= peer["d_fake"] <= 1.0
    assert last["ensemble_top1"] > 35.0
    assert last["img_per_s"] > 0 and last["time_s"] > 0
    assert "epoch 3/3  top-1:" in proc.stderr + proc.stdout


def test_run_directory_records_config_sha_and_versions(afd_run):
    out, _, _ = afd_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"] == "demo" and cfg["method"]["name"] == "afd" and cfg["loop"]["epochs"] == 3
    env = json.loads((out / "env.json").read_text())
    assert env["git_sha"] and {"torch", "timm", "accelerate", "nvidia-dali-cuda130"} <= set(env["versions"])
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "model.safetensors").is_file() and (ckpts[-1] / "MANIFEST.json").is_file()


def test_eval_command_reproduces_the_last_epoch(afd_run, fastafd_cli):
    out, env, _ = afd_run
    proc = fastafd_cli.run(["eval", out, "--checkpoint", "latest"], env)
    result = json.loads(proc.stdout)
    assert f"fastafd: evaluating {result['checkpoint']} (step {result['step']}; newest)" in proc.stderr
    last = rundir.read_metrics(Path(out))[-1]
    for mine, logged in zip(result["peers"], last["peers"]):
        assert mine["top1"] == pytest.approx(logged["top1"])
    assert result["ensemble_top1"] == pytest.approx(last["ensemble_top1"])


def test_cnn_vit_pair_trains_on_the_demo_data_and_the_vit_exports_to_plain_timm(tmp_path, fastafd_cli, monkeypatch):
    """A ResNet with a DeiT (built for the demo's 32 px: 2x2 patch tokens, 192 channels) through the real CLI;
    each exported peer (the DeiT, and the ResNet: a network timm knows once fastafd is imported) gives the logits it
    gives inside fastafd when loaded with the line export prints."""
    import timm
    import torch

    env = fastafd_cli.env(tmp_path / "cache")
    out = tmp_path / "run"
    fastafd_cli.run(["train", "--out", out, "--model.peers", "cifar_resnet8", "deit_tiny_patch16_224",
             "--loop.epochs", "1", "--loop.max_steps_per_epoch", "4", "--log.progress", "off"], env, timeout=900)
    assert [r["epoch"] for r in rundir.read_metrics(out)] == [1]
    exported = tmp_path / "deit.safetensors"
    proc = fastafd_cli.run(["export", out, "--peer", "1", "--out", exported], env, timeout=300)
    info = json.loads(proc.stdout)
    assert info["create_kwargs"] == {"img_size": 32} and "img_size=32" in info["load"]
    assert info["model"] == "deit_tiny_patch16_224" and info["num_classes"] == 10 and info["load"].startswith("timm.create_model(")
    assert exported.stat().st_mode & 0o777 == 0o666 & ~_umask()
    model = eval(info["load"], {"timm": timm}).eval()  # exactly the line users are told to run
    info0 = json.loads(fastafd_cli.run(["export", out, "--peer", "0", "--out", tmp_path / "resnet.safetensors"], env, timeout=300).stdout)
    assert info0["model"] == "cifar_resnet8" and info0["load"].startswith("import fastafd; timm.create_model(")
    scope = {"timm": timm}
    exec(info0["load"].replace("timm.create_model(", "model0 = timm.create_model(", 1), scope)  # the line, as a user runs it
    from fastafd import config
    from fastafd.checkpoint import choice, codec
    from fastafd.session import build_session

    monkeypatch.setenv("FASTAFD_CACHE", env["FASTAFD_CACHE"])
    session = build_session(config.from_dict(json.loads((out / "config.json").read_text())), train=False)
    codec.load_model(choice.latest_valid(out), session.task)
    inside = session.task.peers[1].eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), inside(x))
        assert torch.equal(scope["model0"].eval()(x), session.task.peers[0].eval()(x))
    session.runtime.accelerator.end_training()


def test_eval_and_export_use_the_best_checkpoint_by_default_and_say_so(afd_run, tmp_path, fastafd_cli):
    out, env, _ = afd_run
    rows = rundir.read_metrics(out)
    best = max(rows, key=lambda r: r["ensemble_top1"])
    proc = fastafd_cli.run(["eval", out], env)
    result = json.loads(proc.stdout)
    assert result["step"] == best["step"] and result["chosen"].startswith("best by ensemble top-1")
    assert result["ensemble_top1"] == pytest.approx(best["ensemble_top1"])
    assert f"fastafd: evaluating {result['checkpoint']} (step {best['step']}; best by ensemble top-1" in proc.stderr
    proc = fastafd_cli.run(["export", out, "--out", tmp_path / "p.safetensors"], env, timeout=300)
    assert json.loads(proc.stdout)["step"] == best["step"], proc.stderr[-2000:]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
