"""Loss functions against hand-computed values."""

import math

import torch

from fastafd import losses, metrics


def test_cross_entropy_hand_computed():
    # peer 0: logits (0, ln 3) label 1 -> p = 3/4; peer 1: logits (0, 0) label 1 -> p = 1/2
    logits = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])
    ce = losses.cross_entropy(logits, torch.tensor([1]))
    assert torch.allclose(ce, torch.tensor([-math.log(0.75), math.log(2.0)]), atol=1e-6)


def test_kl_hand_computed_and_teacher_detached():
    t = 2.0
    # peer 0 logits (0, 0): soft p = (1/2, 1/2); peer 1 logits (0, 2 ln 3): at T=2 -> (0, ln 3) -> q = (1/4, 3/4)
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 2 * math.log(3.0)]]], requires_grad=True)
    teachers = torch.tensor([1, 0])
    kl = losses.kl_to_teacher(logits, teachers, t)
    p, q = [0.5, 0.5], [0.25, 0.75]
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q))  # KL(p || q): teacher p, student q
    kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q))
    # peer 0 learns from peer 1: KL(q || p); peer 1 learns from peer 0: KL(p || q); both x T^2
    assert torch.allclose(kl, torch.tensor([kl_qp, kl_pq]) * t * t, atol=1e-6)
    # gradient of peer 0's term reaches peer 0's logits only (the teacher is a constant)
    kl[0].backward()
    assert logits.grad[1].abs().sum() == 0
    assert logits.grad[0].abs().sum() > 0


def test_kl_is_zero_for_identical_peers():
    logits = torch.randn(1, 4, 10).repeat(2, 1, 1)
    assert torch.allclose(losses.kl_to_teacher(logits, torch.tensor([1, 0]), 3.0), torch.zeros(2), atol=1e-6)


def test_kl_to_peers_is_the_mean_over_the_other_peers_and_detaches_them():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    ring = lambda teachers: losses.kl_to_teacher(logits, torch.tensor(teachers), 3.0)  # noqa: E731
    want = (ring([1, 2, 0]) + ring([2, 0, 1])) / 2  # each peer's two teachers, weight 1/2 each
    got = losses.kl_to_peers(logits, 3.0)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, ring([2, 0, 1]), atol=1e-3)  # not the ring's k - 1 alone
    got[0].backward()
    assert logits.grad[1:].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    two = logits[:2].detach()
    assert torch.allclose(losses.kl_to_peers(two, 3.0), losses.kl_to_teacher(two, torch.tensor([1, 0]), 3.0), atol=1e-6)


def test_lsgan_losses_hand_computed():
    d_real = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    d_fake = torch.tensor([[0.5, 0.0], [1.0, 0.5]])
    # D: mean (1 - real)^2 + mean fake^2
    expected_d = torch.tensor([(0.25 + 0.0) / 2 + (0.25 + 0.0) / 2, (1.0 + 0.5625) / 2 + (1.0 + 0.25) / 2])
    assert torch.allclose(losses.lsgan_discriminator(d_real, d_fake), expected_d)
    # G: mean (1 - fake)^2
    assert torch.allclose(losses.lsgan_generator(d_fake), torch.tensor([(0.25 + 1.0) / 2, (0.0 + 0.25) / 2]))


def test_feature_alignment_hand_computed_and_stopgrad():
    s = torch.tensor([1.0, -1.0, 3.0, 0.0], requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0], requires_grad=True)
    assert losses.feature_alignment(s, t, 1).item() == (1 + 2 + 2 + 0) / 4
    l2 = losses.feature_alignment(s, t, 2)
    assert l2.item() == (1 + 4 + 4 + 0) / 4
    l2.backward()
    assert t.grad is None
    assert torch.allclose(s.grad, torch.tensor([2 * 1, 2 * -2, 2 * 2, 0]) / 4)


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.6, 0.1, 0.2, 0.3, 0.4, 0.5]])
    y = torch.tensor([1, 1])  # first: top-1 hit; second: label ranks last -> miss at 5
    assert metrics.topk_correct(logits, y).tolist() == [1, 1]
    assert metrics.topk_correct(logits, torch.tensor([1, 0])).tolist() == [2, 2]
    assert metrics.topk_correct(logits, torch.tensor([0, 5])).tolist() == [0, 2]  # both labels rank 2nd
