"""Pure loss functions of AFD and its baselines: tensors in, tensors out, no state, no host syncs.

Peer logits come stacked as one ``(K, B, C)`` tensor so that the losses of all K peers are one set
of batched kernels instead of a Python loop over peers. ``teachers[k]`` is the index of the peer
that teaches peer ``k`` (its predecessor in the cyclic scheme; the other peer when K = 2);
:func:`kl_to_peers` is the other rule (``method.k_scheme=all``): every other peer teaches, weight 1/(K-1) each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _wide(x: Tensor) -> Tensor:
    """Upcast half-precision activations to fp32 for the loss; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-peer cross-entropy: ``(K, B, C)`` logits, ``(B,)`` labels -> ``(K,)`` batch means."""
    k, b, c = logits.shape
    per_sample = F.cross_entropy(_wide(logits.reshape(k * b, c)), target.repeat(k), reduction="none")
    return per_sample.view(k, b).mean(dim=1)


def kl_to_teacher(logits: Tensor, teachers: Tensor, temperature: float) -> Tensor:
    """Per-peer ``T^2 * KL(softmax(z_j / T) || softmax(z_k / T))`` with the teacher ``j`` detached.

    ``(K, B, C)`` logits and ``(K,)`` teacher indices -> ``(K,)`` batch means (sum over classes).
    """
    return kl_to_targets(logits, logits.index_select(0, teachers), temperature)


def kl_to_peers(logits: Tensor, temperature: float) -> Tensor:
    """Per-peer mean over the other peers ``j != k`` of ``T^2 * KL(softmax(z_j / T) || softmax(z_k / T))``,
    teachers detached (Deep Mutual Learning's rule for K > 2: pairwise KL weighted 1/(K-1)).

    ``(K, B, C)`` logits -> ``(K,)`` batch means (sum over classes); equals :func:`kl_to_teacher` for K = 2.
    """
    k = logits.shape[0]
    t = temperature
    student = F.log_softmax(_wide(logits) / t, dim=-1)  # (K, B, C)
    teacher = student.detach()
    # all K x K pairs at once: [j, k] = KL(teacher j || student k); the diagonal is exactly 0 and left out by the weights
    pairs = F.kl_div(student.unsqueeze(0), teacher.unsqueeze(1), reduction="none", log_target=True).sum(dim=-1).mean(dim=-1)
    off = 1.0 - torch.eye(k, dtype=pairs.dtype, device=pairs.device)
    return (pairs * off).sum(dim=0) / (k - 1) * (t * t)


def kl_to_targets(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Per-peer ``T^2 * KL(softmax(t_k / T) || softmax(z_k / T))`` toward soft targets given as logits
    ``t`` (detached here): ``(K, B, C)`` logits and ``(K, B, C)`` (or broadcastable, e.g. ``(1, B, C)``
    for one shared target) -> ``(K,)`` batch means (sum over classes)."""
    t = temperature
    student = F.log_softmax(_wide(logits) / t, dim=-1)
    teacher = F.log_softmax(_wide(targets.detach()) / t, dim=-1).expand_as(student)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1)
    return kl.mean(dim=1) * (t * t)


def lsgan_discriminator(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Least-squares discriminator loss per discriminator: ``mean (1 - D(real))^2 + mean D(fake)^2``.

    ``d_real`` and ``d_fake`` are ``(K, B)`` discriminator outputs in [0, 1]; returns ``(K,)``.
    """
    return (1.0 - _wide(d_real)).square().mean(dim=-1) + _wide(d_fake).square().mean(dim=-1)


def lsgan_generator(d_fake: Tensor) -> Tensor:
    """Least-squares generator loss per peer: ``mean (1 - D(fake))^2``; ``(K, B)`` -> ``(K,)``."""
    return (1.0 - _wide(d_fake)).square().mean(dim=-1)


def feature_alignment(student: Tensor, teacher: Tensor, p: int) -> Tensor:
    """Direct feature-map alignment ``mean |student - stopgrad(teacher)|^p`` (p = 1 or 2), a scalar."""
    diff = (_wide(student) - _wide(teacher.detach())).abs()
    return diff.mean() if p == 1 else diff.square().mean()
