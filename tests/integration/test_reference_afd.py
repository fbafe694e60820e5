"""fastafd's AFD step vs the plain-PyTorch reference (tests/reference_afd.py): same parameters after 3 iterations."""

import copy

import pytest
import torch

from tests.helpers import ADAM, SGD, batches, tiny_config, tiny_task
from tests.reference_afd import ReferenceAFD, copy_into

CASES = {
    "k2_same": (("cifar_resnet8", "cifar_resnet8"), 32),
    # 64 vs 512 channels and 16x16 vs 2x2 maps: both transfer layers (conv+BN+ReLU+pool, identity)
    "k2_mismatched": (("cifar_resnet8", "resnet10t"), 64),
    "k3_cyclic": (("cifar_resnet8", "cifar_resnet8", "cifar_wrn16_1"), 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_afd_matches_reference_after_three_iterations(case):
    # float64 so that Adam's normalisation of tiny gradients cannot amplify float32 rounding noise
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float64)
    try:
        peers, size = CASES[case]
        cfg = tiny_config(peers, image_size=size, temperature=3.0)
        task, stages = tiny_task(cfg)
        ref = ReferenceAFD(
            [copy.deepcopy(p) for p in task.peers],
            task.shapes,
            temperature=3.0,
            sgd=dict(lr=SGD.lr, momentum=SGD.momentum, weight_decay=SGD.weight_decay),
            adam=dict(lr=ADAM.lr, betas=ADAM.betas, weight_decay=ADAM.weight_decay),
        )
        for mine, theirs in zip(task.transfers, ref.transfers):
            copy_into(theirs, mine)
        for mine, theirs in zip(task.discriminators, ref.discs):
            copy_into(theirs, mine)
        if case == "k2_mismatched":
            assert sum(p.numel() for p in task.transfers[0].parameters()) > 0
            assert isinstance(task.transfers[1], torch.nn.Identity)

        initial_disc = [d.body[0].weight.detach().clone() for d in task.discriminators]
        data = [(x.double(), y) for x, y in batches(3, size=size)]
        for step, (x, y) in enumerate(data):
            for s in stages.values():
                s.set_step(step)
            task.train_step(x, y, stages)
            ref.iteration(x, y)

        pairs = [(task.peers[k], ref.nets[k]) for k in range(len(peers))]
        pairs += [(task.transfers[k], ref.transfers[k]) for k in range(len(peers))]
        pairs += [(task.discriminators[k], ref.discs[k]) for k in range(len(peers))]
        compared = 0
        for mine, theirs in pairs:
            for a, b in zip(list(mine.parameters()) + list(mine.buffers()), list(theirs.parameters()) + list(theirs.buffers())):
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
                compared += 1
        assert compared > 20
        # the run really trained the discriminators (the comparison above is not between untouched weights)
        assert all(not torch.equal(d.body[0].weight, w0) for d, w0 in zip(task.discriminators, initial_disc))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_default_dtype(torch.float32)
