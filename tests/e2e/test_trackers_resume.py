"""Experiment trackers for real, without a network, across a run killed after its checkpoint and resumed: the
TensorBoard server's HTTP data API (both of its readers), W&B in offline mode (its run files read back) and
MLflow on a local SQLite store (read back with MlflowClient)."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from fastafd.observe import tensorboard
from fastafd.observe.trackers import wandb_records

pytestmark = pytest.mark.slow  # the real CLI: subprocesses that train

FASTAFD = shutil.which("fastafd") or ""
PEERS = ["peer0-cifar_resnet8", "peer1-cifar_resnet8"]
STEPS_PER_EPOCH, EPOCHS = 4, 2
TINY = ["--model.peers", "cifar_resnet8", "cifar_resnet8", "--data.format", "synthetic", "--data.synthetic_classes", "10",
        "--data.image_size", "32", "--data.batch_size", "8", "--data.synthetic_samples", "64", "--loop.epochs", str(EPOCHS),
        "--loop.max_steps_per_epoch", str(STEPS_PER_EPOCH), "--loop.log_interval", "1", "--checkpoint.every_steps", "0",
        "--log.progress", "off"]


def fastafd(*args, env):
    cmd = [FASTAFD or sys.executable, *([] if FASTAFD else ["-m", "fastafd.cli"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run with all three trackers (those installed), SIGKILLed after step 6 (its checkpoint: the end of epoch 1,
    step 4), then resumed."""
    pytest.importorskip("tensorboard")
    external = [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name) is not None]
    tmp = tmp_path_factory.mktemp("trackers")
    out = tmp / "tiny-trackers"
    # W&B writes its offline file every 15 s by default: every 0.05 s, the killed run's file holds steps past its checkpoint
    env = {**os.environ, "FASTAFD_CACHE": str(tmp / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.05",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    for key in ("WANDB_API_KEY", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "WANDB_RUN_ID"):
        env.pop(key, None)
    args = ["train", "--out", str(out), *TINY, "--log.trackers", "tensorboard", *external, "--log.project", "fastafd-test"]
    killed = fastafd(*args, env={**env, "FASTAFD_FAULT": "kill@step=6"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    first = json.loads((out / "trackers.json").read_text()) if external else {}
    assert all(first[name]["last_step"] >= 5 for name in external)  # logged past the checkpoint (step 4)
    proc = fastafd(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout + proc.stderr
    return out, env, first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.parametrize("load_fast", ["true", "false"])  # TensorBoard's Rust data server and its Python reader
def test_tensorboard_server_shows_each_step_once_after_the_resume(resumed, load_fast, tmp_path):
    out, _, _ = resumed
    port = free_port()
    log = (tmp_path / "tensorboard.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port),
                               f"--load_fast={load_fast}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    try:
        deadline, tags = time.monotonic() + 120, {}
        while not tags.get("tensorboard"):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "tensorboard.log").read_text()[-2000:]
            try:
                tags = get(f"{base}/tags")
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(1)  # the run's files are complete; a second read sees them all
        tags = get(f"{base}/tags")
        assert set(tags) == {"tensorboard"}
        want = tensorboard.train_tags(["cifar_resnet8"] * 2, ("ce", "kl", "g_loss", "d_loss", "d_real", "d_fake"), ("logit", "disc", "feat"))
        want |= tensorboard.eval_tags(["cifar_resnet8"] * 2, ("d_real", "d_fake"))
        assert set(tags["tensorboard"]) == want
        total = STEPS_PER_EPOCH * EPOCHS
        for tag in sorted(want):
            points = get(f"{base}/scalars?" + urllib.parse.urlencode({"run": "tensorboard", "tag": tag}))  # [wall_time, step, value]
            steps = [step for _, step, _ in points]
            expected = [STEPS_PER_EPOCH, total] if tag.startswith("val/") else list(range(1, total + 1))
            assert steps == expected, (tag, steps)  # the killed run's steps 5 and 6 once, in order
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        ensemble = get(f"{base}/scalars?" + urllib.parse.urlencode({"run": "tensorboard", "tag": "val/top1/ensemble"}))
        assert ensemble[-1][2] == pytest.approx(last["ensemble_top1"], abs=1e-4)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_wandb_offline_run_continues_with_each_step_once(resumed):
    pytest.importorskip("wandb")
    out, _, first = resumed
    ids = json.loads((out / "trackers.json").read_text())["wandb"]
    assert ids["id"] == first["wandb"]["id"] and ids["last_step"] == STEPS_PER_EPOCH * EPOCHS
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the killed run and the resumed one, one offline segment each
    history: dict[str, list[tuple[int, float]]] = {}
    runs, config = [], {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append(record.run)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":  # the config stored after the run started (accelerate's store_init_configuration)
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        history.setdefault(key, []).append((items["_step"], value))
    assert {r.run_id for r in runs} == {ids["id"]} and {r.display_name for r in runs} == {out.name}
    assert {r.project for r in runs} == {"fastafd-test"}
    assert config["optim"]["lr"] == json.loads((out / "config.json").read_text())["optim"]["lr"]
    total = STEPS_PER_EPOCH * EPOCHS
    steps = [s for s, _ in history[f"train/ce/{PEERS[0]}"]]
    assert steps == list(range(1, total + 1))  # no step twice, none missing
    assert [s for s, _ in history["val/top1/ensemble"]] == [STEPS_PER_EPOCH, total]
    assert {"lr/logit", "lr/disc", "lr/feat", "perf/img_per_s", f"val/d_real/{PEERS[1]}"} <= set(history)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert history["val/top1/ensemble"][-1][1] == pytest.approx(last["ensemble_top1"], abs=1e-4)


def test_mlflow_run_continues_with_each_step_once(resumed):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, env, first = resumed
    ids = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert ids["run_id"] == first["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("fastafd-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["run_id"]]  # one tracker run across the resume
    run = client.get_run(ids["run_id"])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    assert float(run.data.params["optim.lr"]) == json.loads((out / "config.json").read_text())["optim"]["lr"]
    assert run.data.params["model.peers"] == json.dumps(["cifar_resnet8", "cifar_resnet8"])
    total = STEPS_PER_EPOCH * EPOCHS
    steps = [m.step for m in client.get_metric_history(ids["run_id"], f"train/ce/{PEERS[0]}")]
    assert sorted(steps) == list(range(1, total + 1))
    val = client.get_metric_history(ids["run_id"], "val/top1/ensemble")
    assert sorted(m.step for m in val) == [STEPS_PER_EPOCH, total]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert max(val, key=lambda m: m.step).value == pytest.approx(last["ensemble_top1"], abs=1e-4)
