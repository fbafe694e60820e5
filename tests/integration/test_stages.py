"""Each optimizer stage touches only its own parameters; every method trains through its task."""

import pytest
import torch

from fastafd.methods import registry
from tests.helpers import batches, changed, snapshot, tiny_config, tiny_task

PEERS = ("cifar_resnet8", "cifar_wrn16_2")  # mismatched channels: the transfer layers have parameters


def _groups(task):
    head = {f"peers.{k}.{n}" for k, p in enumerate(task.peers) for n, _ in p.get_classifier().named_parameters(prefix="fc")}
    names = {n for n, _ in task.named_parameters()}
    disc = {n for n in names if n.startswith("discriminators.")}
    transfer = {n for n in names if n.startswith("transfers.")}
    extractor = {n for n in names if n.startswith("peers.")} - head
    return head, extractor, transfer, disc


def test_heads_are_the_classifiers():
    task, _ = tiny_task(tiny_config(PEERS))
    head, extractor, transfer, disc = _groups(task)
    assert head == {"peers.0.fc.weight", "peers.0.fc.bias", "peers.1.fc.weight", "peers.1.fc.bias"}
    assert transfer and disc and extractor


def test_discriminator_step_changes_only_discriminators():
    task, stages = tiny_task(tiny_config(PEERS))
    head, extractor, transfer, disc = _groups(task)
    x, y = batches(1)[0]
    before = snapshot(task)
    loss, _ = task.disc_loss(task.mapped_features(x))
    stages["disc"].step(loss)
    assert changed(before, task) == disc


def test_feature_step_changes_only_extractors_and_transfers():
    task, stages = tiny_task(tiny_config(PEERS))
    head, extractor, transfer, disc = _groups(task)
    x, y = batches(1)[0]
    before = snapshot(task)
    loss, _ = task.gen_loss(task.mapped_features(x))
    stages["feat"].step(loss)
    assert changed(before, task) == extractor | transfer


def test_feature_step_leaves_no_gradient_on_frozen_discriminators():
    task, stages = tiny_task(tiny_config(PEERS))
    x, _ = batches(1)[0]
    loss, _ = task.gen_loss(task.mapped_features(x))
    stages["feat"].step(loss)
    assert all(p.grad is None for p in task.discriminators.parameters())


def test_logit_step_changes_no_discriminator_or_transfer():
    task, stages = tiny_task(tiny_config(PEERS))
    head, extractor, transfer, disc = _groups(task)
    x, y = batches(1)[0]
    before = snapshot(task)
    loss, _ = task.logit_forward(x, y)
    stages["logit"].step(loss)
    moved = changed(before, task)
    assert moved == head | extractor


def test_full_afd_iteration_moves_every_group_and_reports_metrics():
    task, stages = tiny_task(tiny_config(PEERS))
    before = snapshot(task)
    x, y = batches(1)[0]
    metrics = task.train_step(x, y, stages)
    assert set(metrics) == {"ce", "kl", "d_loss", "d_real", "d_fake", "g_loss"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in metrics.values())
    assert all(((0 <= metrics[k]) & (metrics[k] <= 1)).all() for k in ("d_real", "d_fake"))
    assert changed(before, task) == set(before)


@pytest.mark.parametrize("method", registry.names())
def test_every_method_trains_and_evaluates(method):
    same = registry.get(method).same_architecture  # one, cl: branches of one network
    cfg = tiny_config((PEERS[0],) * 2 if same else PEERS, method=method)
    task, stages = tiny_task(cfg)
    specs = task.stages()  # what the method declares: one optimizer stage each, driven by the configs the registry lists
    assert set(stages) == set(specs) and {spec.optim for spec in specs.values()} == set(registry.get(method).optimizers)
    assert {id(p) for spec in specs.values() for p in spec.params} == {id(p) for p in task.parameters()}  # every parameter is in one
    data = batches(4)
    losses0 = None
    for step, (x, y) in enumerate(data * 3):
        for s in stages.values():
            s.set_step(step)
        m = task.train_step(x, y, stages)
        losses0 = losses0 if losses0 is not None else m["ce"]
    assert (m["ce"] < losses0).all(), (method, losses0, m["ce"])  # it fits the 4 repeated batches
    assert ("kl" in m) == (method != "independent")
    assert ("align" in m) == (method in ("l1", "l2"))
    task.eval()
    out = task.eval_step(*data[0])
    assert out["correct"].shape == (2, 2) and out["count"].item() == 8
    assert (out["correct"][:, 0] <= out["correct"][:, 1]).all()


def test_independent_accepts_one_peer_and_pair_methods_refuse_it():
    from fastafd.errors import UserError

    cfg = tiny_config(("cifar_resnet8",), method="independent")
    task, stages = tiny_task(cfg)
    assert task.k == 1
    with pytest.raises(UserError, match="K >= 2"):
        tiny_config(("cifar_resnet8",), method="afd")
