"""fastafd's AFD step vs the plain-PyTorch reference (tests/reference_afd.py): same parameters after 3 iterations."""

import copy

import pytest
import torch

from fastafd.bench.reference import ReferenceAFD, copy_into
from tests.helpers import ADAM, SGD, batches, iterate, split_bank, tiny_config, tiny_task

CASES = {
    "k2_same": (("cifar_resnet8", "cifar_resnet8"), 32),
    # 64 vs 512 channels and 16x16 vs 2x2 maps: both transfer layers (conv+BN+ReLU+pool, identity)
    "k2_mismatched": (("cifar_resnet8", "resnet10t"), 64),
    "k3_cyclic": (("cifar_resnet8", "cifar_resnet8", "cifar_wrn16_1"), 32),
    # a CNN with a ViT: 64x8x8 against the ViT's 192 channels of 2x2 patch tokens (built for 32 px)
    "k2_cnn_vit": (("cifar_resnet8", "deit_tiny_patch16_224"), 32),
}


ATOL = {"k2_cnn_vit": 1e-7}
"""The ViT's key biases have a gradient of exactly zero in exact arithmetic (softmax ignores a shift common to
all keys), so theirs is rounding noise of about 1e-17, which the feature stage's Adam turns into moves of up
to ~4e-8; every real update of these three iterations is 1e-3 or more."""


@pytest.mark.parametrize(
    "case, order, k_scheme",
    [(c, "sequential", "all") for c in CASES] + [(c, "simultaneous", "all") for c in ("k2_mismatched", "k3_cyclic", "k2_cnn_vit")]
    + [("k3_cyclic", "sequential", "ring")],  # the paper's KL ring (the discriminators are a ring in every case)
)
def test_afd_matches_reference_after_three_iterations(case, order, k_scheme, float64):
    # float64 so that Adam's normalisation of tiny gradients cannot amplify float32 rounding noise
    peers, size = CASES[case]
    cfg = tiny_config(peers, image_size=size, temperature=3.0, order=order, k_scheme=k_scheme)
    task, stages = tiny_task(cfg)
    ref = ReferenceAFD(
        [copy.deepcopy(p) for p in task.peers],
        task.shapes,
        temperature=3.0,
        sgd=dict(lr=SGD.lr, momentum=SGD.momentum, weight_decay=SGD.weight_decay),
        adam=dict(lr=ADAM.lr, betas=ADAM.betas, weight_decay=ADAM.weight_decay),
        k_scheme=k_scheme,
    )
    for mine, theirs in zip(task.transfers, ref.transfers):
        copy_into(theirs, mine)
    for theirs, mine in zip(ref.discs, split_bank(task.discriminators), strict=True):
        copy_into(theirs, mine)
    if case in ("k2_mismatched", "k2_cnn_vit"):
        assert sum(p.numel() for p in task.transfers[0].parameters()) > 0
        assert isinstance(task.transfers[1], torch.nn.Identity)

    initial_disc = task.discriminators.conv1.weight.detach().clone()
    data = [(x.double(), y) for x, y in batches(3, size=size)]
    iterate(task, stages, data)
    for x, y in data:
        (ref.iteration if order == "sequential" else ref.iteration_simultaneous)(x, y)

    pairs = [(task.peers[k], ref.nets[k]) for k in range(len(peers))]
    pairs += [(task.transfers[k], ref.transfers[k]) for k in range(len(peers))]
    pairs += list(zip(split_bank(task.discriminators), ref.discs, strict=True))
    compared = 0
    for mine, theirs in pairs:
        for a, b in zip(list(mine.parameters()) + list(mine.buffers()), list(theirs.parameters()) + list(theirs.buffers())):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=ATOL.get(case, 1e-9))
            compared += 1
    assert compared > 20
    # the run really trained the discriminators (the comparison above is not between untouched weights)
    assert not torch.equal(task.discriminators.conv1.weight, initial_disc)
