"""``kdcl`` against a plain-PyTorch loop written from the method's description (KDCL-MinLogit, Guo et al.
CVPR 2020): same parameters after 3 iterations (float64, CPU), for K = 2 and K = 3."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastafd.methods.kdcl import min_logit_target
from tests.helpers import SGD, batches, iterate, snapshot, tiny_config, tiny_task


def reference_iteration(nets, opt, x, y, temperature):
    """One SGD step on sum_k CE(y, z_k) + T^2 KL(p_t || p_k), teacher t_c = min_k (z_kc - z_ky), detached."""
    logits = [net(x) for net in nets]
    with torch.no_grad():
        shifted = []
        for z in logits:
            true = z[torch.arange(len(y)), y].unsqueeze(1)  # each sample's true-class score
            shifted.append(z - true)
        teacher = shifted[0]
        for s in shifted[1:]:
            teacher = torch.minimum(teacher, s)
        p_teacher = F.softmax(teacher / temperature, dim=1)
    loss = 0.0
    for z in logits:
        log_p = F.log_softmax(z / temperature, dim=1)
        kl = (p_teacher * (torch.log(p_teacher) - log_p)).sum(dim=1).mean()
        loss = loss + F.cross_entropy(z, y) + temperature**2 * kl
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("peers", [("cifar_resnet8", "cifar_resnet8"), ("cifar_resnet8", "cifar_resnet8", "cifar_wrn16_1")])
def test_kdcl_matches_a_plain_loop_after_three_iterations(peers, float64):
    cfg = tiny_config(peers, method="kdcl", temperature=3.0)
    task, stages = tiny_task(cfg)
    assert set(stages) == {"logit"}
    nets = [copy.deepcopy(p) for p in task.peers]
    params = [p for net in nets for p in net.parameters()]
    opt = torch.optim.SGD(params, lr=SGD.lr, momentum=SGD.momentum, weight_decay=SGD.weight_decay)
    initial = snapshot(task)
    data = [(x.double(), y) for x, y in batches(3)]
    iterate(task, stages, data)
    for x, y in data:
        reference_iteration(nets, opt, x, y, 3.0)
    for mine, theirs in zip(task.peers, nets, strict=True):
        for a, b in zip(list(mine.parameters()) + list(mine.buffers()), list(theirs.parameters()) + list(theirs.buffers()), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert any(not torch.equal(v, initial[k]) for k, v in task.named_parameters())


def test_min_logit_target_keeps_the_true_class_at_zero_and_takes_the_smallest_rival():
    z = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 3.0, -1.0]]])  # K=2 peers, B=1, C=3; label 1
    t = min_logit_target(z, torch.tensor([1]))
    assert t.shape == (1, 1, 3)
    assert t.tolist() == [[[-3.0, 0.0, -4.0]]]  # peer 0: (1, 0, -1); peer 1: (-3, 0, -4): min per class
