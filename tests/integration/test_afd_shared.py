"""``afd_shared`` (the one-optimizer ablation of claim 3): each stage moves exactly its parameters, and three
iterations give the parameters of a plain-PyTorch loop written from the method's description (float64, CPU)."""

import copy

import pytest
import torch

from fastafd.bench.reference import RefDiscriminator, RefTransfer, copy_into
from tests.helpers import ADAM, SGD, batches, changed, iterate, snapshot, split_bank, tiny_config, tiny_task

PEERS = ("cifar_resnet8", "cifar_wrn16_2")  # 64 vs 128 channels: the first transfer layer has parameters


def _groups(task):
    names = {n for n, _ in task.named_parameters()}
    disc = {n for n in names if n.startswith("discriminators.")}
    transfer = {n for n in names if n.startswith("transfers.")}
    peers = {n for n in names if n.startswith("peers.")}
    return peers, transfer, disc


def test_two_stages_shared_sgd_over_peers_and_transfers_and_adam_over_discriminators():
    task, stages = tiny_task(tiny_config(PEERS, method="afd_shared"))
    assert set(stages) == {"shared", "disc"}
    peers, transfer, disc = _groups(task)
    assert transfer, "the mismatched pair has a transfer layer with parameters"
    assert isinstance(stages["shared"].optimizer, torch.optim.SGD) and isinstance(stages["disc"].optimizer, torch.optim.Adam)
    assert stages["shared"].lr == pytest.approx(SGD.lr) and stages["disc"].lr == pytest.approx(ADAM.lr)
    ids = {id(p): n for n, p in task.named_parameters()}
    assert {ids[id(p)] for p in stages["shared"].params} == peers | transfer
    assert {ids[id(p)] for p in stages["disc"].params} == disc


def test_discriminator_step_moves_only_the_discriminators():
    task, stages = tiny_task(tiny_config(PEERS, method="afd_shared"))
    *_, disc = _groups(task)
    x, y = batches(1)[0]
    before = snapshot(task)
    _, _, mapped = task.forward_all(x, y)
    loss, _ = task.disc_loss(mapped)
    stages["disc"].step(loss)
    assert changed(before, task) == disc


def test_shared_step_moves_peers_and_transfers_and_never_a_discriminator():
    task, stages = tiny_task(tiny_config(PEERS, method="afd_shared"))
    peers, transfer, _ = _groups(task)
    x, y = batches(1)[0]
    before = snapshot(task)
    logit_loss, _, mapped = task.forward_all(x, y)
    g_loss, _ = task.gen_loss(mapped)
    stages["shared"].step(logit_loss + g_loss)
    assert changed(before, task) == peers | transfer
    assert all(p.grad is None for p in task.discriminators.parameters())


class ReferenceShared:
    """docs/method.md's AFD losses with the generator loss added to the logit loss, one SGD over the networks and
    the transfer layers; the discriminators' own Adam. Plain modules, loops over peers, nothing from fastafd."""

    def __init__(self, nets, shapes, *, temperature, sgd, adam):
        self.nets, self.k, self.t = nets, len(nets), temperature
        target = (max(s[0] for s in shapes), min(s[1] for s in shapes), min(s[2] for s in shapes))
        self.transfers = [RefTransfer(s, target) for s in shapes]
        self.discs = [RefDiscriminator(target[0]) for _ in shapes]
        shared = [p for net in nets for p in net.parameters()] + [p for t in self.transfers for p in t.parameters()]
        self.opt_shared = torch.optim.SGD(shared, **sgd)
        self.opt_d = torch.optim.Adam([p for d in self.discs for p in d.parameters()], **adam)

    def iteration(self, x, y):
        feats = [net.forward_features(x) for net in self.nets]
        logits = [net.forward_head(f) for net, f in zip(self.nets, feats)]
        maps = [self.transfers[k](feats[k]) for k in range(self.k)]
        # discriminator k: its teacher's (k - 1) map is real, its own network's fake
        self.opt_d.zero_grad()
        loss_d = 0.0
        for k in range(self.k):
            j = (k - 1) % self.k
            loss_d = loss_d + ((1 - self.discs[k](maps[j].detach())) ** 2).mean() + (self.discs[k](maps[k].detach()) ** 2).mean()
        loss_d.backward()
        self.opt_d.step()
        # one loss, one optimizer: logit loss + generator loss through the updated discriminators (D_k: a ring)
        loss = 0.0
        for k in range(self.k):
            log_p_k = torch.log_softmax(logits[k] / self.t, dim=1)
            others = [j for j in range(self.k) if j != k]  # k_scheme all (the default): every other peer, 1/(K-1) each
            kl = 0.0
            for j in others:
                p_j = torch.softmax(logits[j].detach() / self.t, dim=1)
                kl = kl + (p_j * (torch.log(p_j) - log_p_k)).sum(dim=1).mean() / len(others)
            loss = loss + torch.nn.functional.cross_entropy(logits[k], y) + self.t**2 * kl
            loss = loss + ((1 - self.discs[k](maps[k])) ** 2).mean()
        self.opt_shared.zero_grad()
        loss.backward()
        self.opt_shared.step()


@pytest.mark.parametrize("peers", [PEERS, ("cifar_resnet8", "cifar_resnet8", "cifar_wrn16_1")], ids=["k2_mismatched", "k3_cyclic"])
def test_afd_shared_matches_a_plain_loop_after_three_iterations(peers, float64):
    cfg = tiny_config(peers, method="afd_shared", temperature=3.0)
    task, stages = tiny_task(cfg)
    ref = ReferenceShared([copy.deepcopy(p) for p in task.peers], task.shapes, temperature=3.0,
                          sgd=dict(lr=SGD.lr, momentum=SGD.momentum, weight_decay=SGD.weight_decay),
                          adam=dict(lr=ADAM.lr, betas=ADAM.betas, weight_decay=ADAM.weight_decay))
    for mine, theirs in zip(task.transfers, ref.transfers, strict=True):
        copy_into(theirs, mine)
    for theirs, mine in zip(ref.discs, split_bank(task.discriminators), strict=True):
        copy_into(theirs, mine)
    initial = snapshot(task)
    data = [(x.double(), y) for x, y in batches(3)]
    iterate(task, stages, data)
    for x, y in data:
        ref.iteration(x, y)
    pairs = [(task.peers[k], ref.nets[k]) for k in range(len(peers))]
    pairs += [(task.transfers[k], ref.transfers[k]) for k in range(len(peers))]
    pairs += list(zip(split_bank(task.discriminators), ref.discs, strict=True))
    compared = 0
    for mine, theirs in pairs:
        for a, b in zip(list(mine.parameters()) + list(mine.buffers()), list(theirs.parameters()) + list(theirs.buffers()), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
            compared += 1
    assert compared > 20
    moved = changed(initial, task)  # the comparison above is not between untouched weights
    assert any(n.startswith("discriminators.") for n in moved)
    assert any(n.startswith("transfers.") for n in moved) == any(True for t in task.transfers for _ in t.parameters())
