"""Checkpoint files: atomic writes, manifests, pruning, optimizer round trip, no pickle."""

import json
import subprocess
import warnings

import pytest
import torch

from fastafd.checkpoint import choice, codec, paths, retain, store
from fastafd.errors import UserError
from fastafd.run import atomic

STATE = {"epoch": 1, "epoch_step": 0, "stages": {}, "guard": {}, "meter": {}, "config": {},
         "ranks": [{"rng": {"python": [3, [0], None], "numpy": ["MT19937", [0], 0, 0, 0.0], "torch": ""}, "loader": None}]}
"""The smallest state.json that loads (one process, no optimizer stages)."""


def _write(run, step, keep=3, metric=None, value=1.0):
    tensors = {paths.MODEL: {"w": torch.full((4,), value)}, paths.OPTIM: {"s/0/m": torch.zeros(2)}}
    return store.write(run, step, tensors, STATE, keep=keep, metric=metric)


def test_write_is_complete_and_verifies(tmp_path):
    path = _write(tmp_path, 7)
    assert path.name == "step-000000007"
    assert sorted(p.name for p in path.iterdir()) == ["MANIFEST.json", "model.safetensors", "optim.safetensors", "state.json"]
    ckpt = store.load(path)
    assert ckpt.step == 7 and torch.equal(ckpt.tensors(paths.MODEL)["w"], torch.ones(4))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keeps_the_newest_and_the_best(tmp_path):
    _write(tmp_path, 1, metric=90.0)
    for step, metric in ((2, 10.0), (3, None), (4, 20.0), (5, None)):
        _write(tmp_path, step, keep=2, metric=metric)
    names = [p.name for p in paths.list_checkpoints(tmp_path)]
    assert names == ["step-000000005", "step-000000004", "step-000000001"]  # newest 2 + the best (step 1)
    assert retain.best_name(tmp_path) == "step-000000001"


def test_truncated_latest_falls_back_with_a_warning_naming_the_file(tmp_path):
    _write(tmp_path, 1, value=1.0)
    latest = _write(tmp_path, 2, value=2.0)
    bad = latest / paths.MODEL
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.warns(UserWarning, match=str(bad)):
        ckpt = choice.latest_valid(tmp_path)
    assert ckpt.step == 1 and torch.equal(ckpt.tensors(paths.MODEL)["w"], torch.ones(4))


def test_the_warning_names_the_checkpoint_used_instead(tmp_path):
    _write(tmp_path, 1, value=1.0)
    bad = [_write(tmp_path, step) / paths.MODEL for step in (2, 3)]
    for path in bad:
        path.write_bytes(path.read_bytes()[:20])
    with pytest.warns(UserWarning) as caught:
        assert choice.latest_valid(tmp_path).step == 1
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    for path, message in zip(reversed(bad), messages):
        assert str(path) in message and "using step-000000001 instead" in message
        assert "previous one" not in message


def test_no_valid_checkpoint_is_one_line_listing_each(tmp_path):
    for step in (1, 2):
        bad = _write(tmp_path, step) / paths.STATE
        bad.write_text("{")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using the previous one" when there is none
        with pytest.raises(UserError) as e:
            choice.latest_valid(tmp_path)
    message = str(e.value)
    assert "none of the 2 checkpoints" in message and "step-000000002: " in message and "step-000000001: " in message


def test_unfinished_write_is_ignored_and_cleaned(tmp_path):
    _write(tmp_path, 1)
    partial = tmp_path / "checkpoints" / "step-000000002"
    partial.mkdir()
    (partial / paths.MODEL).write_bytes(b"partial")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a writer killed mid-write: its pid names no process any more
    stale = tmp_path / "checkpoints" / f".tmp-step-000000003-{dead.pid}-0badc0de"
    stale.mkdir()
    with pytest.warns(UserWarning, match="MANIFEST.json is missing"):
        assert choice.latest_valid(tmp_path).step == 1
    _write(tmp_path, 4)
    assert not stale.exists()


def test_pickled_checkpoint_is_refused(tmp_path):
    path = _write(tmp_path, 1)
    # replace the weights by a pickle (what torch.save writes) and make the manifest agree with it
    torch.save({"w": torch.ones(4), "evil": ValueError("arbitrary object")}, path / paths.MODEL)
    manifest = json.loads((path / paths.MANIFEST).read_text())
    manifest["files"][paths.MODEL] = {"size": (path / paths.MODEL).stat().st_size, "sha256": atomic.sha256_file(path / paths.MODEL)}
    (path / paths.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store.CorruptCheckpoint, match="never unpickles"):
        store.load(path)
    with pytest.raises(UserError, match="never unpickles"):
        choice.resolve(str(path), None)


def test_optimizer_state_round_trip_through_safetensors_and_json():
    p = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    for cls in (torch.optim.SGD, torch.optim.Adam):
        opt = cls(p, lr=0.1, **({"momentum": 0.9} if cls is torch.optim.SGD else {}))
        for _ in range(2):
            for q in p:
                q.grad = torch.randn_like(q)
            opt.step()
        tensors, meta = codec.optimizer_to_safe(opt, "s")
        meta = json.loads(json.dumps(meta))  # really JSON
        fresh = cls(p, lr=0.1, **({"momentum": 0.9} if cls is torch.optim.SGD else {}))
        fresh.load_state_dict(codec.optimizer_from_safe(tensors, meta, "s"))
        a, b = opt.state_dict()["state"], fresh.state_dict()["state"]
        assert a.keys() == b.keys()
        for pid in a:
            for key in a[pid]:
                assert torch.equal(torch.as_tensor(a[pid][key]), torch.as_tensor(b[pid][key])), (cls, key)


def test_resume_none_refuses_a_run_with_checkpoints(tmp_path):
    _write(tmp_path, 1)
    with pytest.raises(UserError, match="already holds checkpoints"):
        choice.resolve("none", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choice.resolve("auto", tmp_path).step == 1
