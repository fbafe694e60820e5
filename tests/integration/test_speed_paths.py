"""The fast paths give the same answers: fused discriminators, non-finite skipping, compile, bf16."""

import copy
from dataclasses import replace

import pytest
import torch

from fastafd import losses
from fastafd.bench.reference import RefDiscriminator
from fastafd.models.discriminator import DiscriminatorBank
from tests.helpers import batches, fill_bank, iterate, split_bank, tiny_config, tiny_task

PEERS = ("cifar_resnet8", "cifar_wrn16_2")


def test_discriminator_bank_equals_per_peer_discriminators():
    torch.manual_seed(0)
    k, c = 3, 32
    discs = [RefDiscriminator(c) for _ in range(k)]
    bank = DiscriminatorBank(c, k)
    fill_bank(bank, discs)
    real = torch.randn(k, 6, c, 4, 4, requires_grad=True)
    fake = torch.randn(k, 6, c, 4, 4, requires_grad=True)
    # per-peer reference: a Python loop of separate discriminators and per-peer LSGAN losses
    ref_loss = sum(((1 - d(real[i])) ** 2).mean() + (d(fake[i]) ** 2).mean() for i, d in enumerate(discs))
    ref_loss.backward()
    ref_grads = [real.grad.clone(), fake.grad.clone()]
    real.grad = fake.grad = None
    loss = losses.lsgan_discriminator(bank(real), bank(fake)).sum()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(real.grad, ref_grads[0])
    torch.testing.assert_close(fake.grad, ref_grads[1])
    for d, e in zip(discs, split_bank(bank), strict=True):
        # parameter gradients: the bank's conv1 rows of group i are discriminator i's conv1 gradient
        i = discs.index(d)
        c2 = c // 2
        torch.testing.assert_close(bank.conv1.weight.grad[i * c2 : (i + 1) * c2], d.conv1.weight.grad)
        torch.testing.assert_close(bank.fc_weight.grad[i], d.fc.weight.grad[0])
        # running statistics were updated identically
        torch.testing.assert_close(e.bn1.running_mean, d.bn1.running_mean)


def _state(task, stages):
    params = {k: v.detach().clone() for k, v in task.state_dict().items()}
    opts = {n: copy.deepcopy(s.optimizer.state_dict()["state"]) for n, s in stages.items()}
    return params, opts


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_nan_in_one_peer_loss_skips_every_optimizer(order, monkeypatch):
    task, stages = tiny_task(tiny_config(PEERS, order=order))
    data = batches(2)
    iterate(task, stages, data[:1])  # optimizer states exist
    before_params, before_opts = _state(task, stages)
    real_ce = losses.cross_entropy

    def poisoned(logits, target):
        ce = real_ce(logits, target)
        return ce * torch.tensor([float("nan"), 1.0])  # peer 0's term only

    monkeypatch.setattr(losses, "cross_entropy", poisoned)
    iterate(task, stages, data[1:], start=1)
    after_params, after_opts = _state(task, stages)
    for key, value in before_params.items():
        assert torch.equal(value, after_params[key]), key  # parameters and BN statistics
    for name in stages:
        for pid, st in before_opts[name].items():
            for field, value in st.items():
                assert torch.equal(value, after_opts[name][pid][field]), (name, field)
    guard = stages.guard
    assert guard.skipped.item() == 1 and guard.streak.item() == 1
    # and training goes on normally afterwards
    monkeypatch.setattr(losses, "cross_entropy", real_ce)
    iterate(task, stages, data[:1], start=2)
    assert guard.skipped.item() == 1 and guard.streak.item() == 0
    assert not torch.equal(task.peers[0].fc.weight, before_params["peers.0.fc.weight"])


def test_nan_in_generator_loss_skips_feature_step():
    task, stages = tiny_task(tiny_config(PEERS))
    x, y = batches(1)[0]
    guard = stages.guard
    guard.begin()
    before = {n: p.detach().clone() for n, p in task.transfers.named_parameters()}
    loss, _ = task.gen_loss(task.mapped_features(x))
    stages["feat"].step(loss * float("inf"))
    guard.end()
    assert all(torch.equal(p, before[n]) for n, p in task.transfers.named_parameters())
    assert guard.skipped.item() == 1


def _train_copy(cfg, compile=False, dtype=torch.float32, steps=2):
    task, stages = tiny_task(cfg, compile=compile, dtype=dtype)
    metrics = iterate(task, stages, batches(steps))
    return task, metrics


@pytest.mark.slow
def test_compiled_step_matches_eager():
    cfg = tiny_config(("cifar_resnet8", "cifar_resnet8"), batch=8)
    # Adam turns float-rounding differences of near-zero gradients into lr-sized steps; a tiny Adam
    # lr bounds that, so the tolerance below checks the SGD path and the losses tightly
    cfg.adv_optim = replace(cfg.adv_optim, lr=1e-7)
    eager, m_eager = _train_copy(cfg)
    compiled, m_compiled = _train_copy(cfg, compile=True)
    for key in m_eager:
        torch.testing.assert_close(m_compiled[key], m_eager[key], rtol=1e-3, atol=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_bf16_step_matches_fp32_within_bf16_tolerance():
    cfg = tiny_config(("cifar_resnet8", "cifar_resnet8"), batch=8)
    fp32, m32 = _train_copy(cfg, steps=1)
    bf16, m16 = _train_copy(cfg, dtype=torch.bfloat16, steps=1)
    for key in ("ce", "kl", "d_loss", "g_loss"):
        torch.testing.assert_close(m16[key], m32[key], rtol=3e-2, atol=2e-2)
    # after one step the parameters moved the same way (bf16 rounding only)
    drift = max((a - b).abs().max().item() for a, b in zip(fp32.parameters(), bf16.parameters()))
    assert drift < 2e-2
    moved = max((a - b).abs().max().item() for a, b in zip(fp32.parameters(), tiny_task(cfg)[0].parameters()))
    assert moved > 5 * drift  # the comparison is not between untouched weights
