"""Part of tests/integration/dist_worker.py's 2-process run (gloo): gradient syncs (``fastafd/comm.py``)
when the ranks do not produce gradients for the same parameters: a residual branch that rank 1 skips in some steps (its gradient bucket never fills there), a layer no
rank uses, and a timm peer with stochastic depth (``drop_path_rate``, a different draw per rank). Each
runs with the overlapped sync (one parameter per bucket, so the order of the bucket all-reduces
matters) and with the coalesced reference; parameters go to OUT for the test to compare.
"""

import json
from pathlib import Path

import timm
import torch
from torch import nn

from fastafd.comm import CoalescedSync, OverlappedSync
from fastafd.steps import Stage, StepGuard

STEPS, WIDTH = 4, 16
SKIPS = {1: {0, 2}}
"""Rank -> steps in which it leaves ``branch`` out of its forward pass."""
CPU = torch.device("cpu")


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(WIDTH, WIDTH, bias=False)  # no rank ever calls it
        self.first = nn.Linear(WIDTH, WIDTH, bias=False)
        self.middle = nn.Linear(WIDTH, WIDTH, bias=False)
        self.branch = nn.Linear(WIDTH, WIDTH, bias=False)  # same size as `middle`: a swapped order would sum the wrong bucket silently
        self.head = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor, skip: bool) -> torch.Tensor:
        h = self.first(x)
        h = h + self.middle(h)
        if not skip:
            h = h + self.branch(h)
        return self.head(h).square().mean()


def run(model: nn.Module, sync, loss_of) -> dict:
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)  # a zero gradient would still move a parameter
    guard = StepGuard(CPU)
    stage = Stage("all", params, optimizer, None, guard, sync)
    for step in range(STEPS):
        guard.begin()
        stage.step(loss_of(step))
        guard.end()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def unused_parameters(rank: int, out: Path) -> None:
    r = rank
    g = torch.Generator().manual_seed(1 + r)  # each rank its own data
    xs = [torch.randn(8, WIDTH, generator=g) for _ in range(STEPS)]
    images = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(STEPS)]
    labels = [torch.randint(0, 10, (4,), generator=g) for _ in range(STEPS)]
    syncs = {"coalesced": CoalescedSync, "overlapped": lambda: OverlappedSync(bucket_mb=WIDTH * WIDTH * 4 / 2**20)}
    launched = {}
    for name, make in syncs.items():
        torch.manual_seed(0)
        model = Branchy()
        sync = make()
        result = run(model, sync, lambda step: model(xs[step], skip=step in SKIPS.get(r, ())))  # noqa: B023
        torch.save(result, out / f"branchy.{name}.rank{r}.pt")
        launched[name] = getattr(sync, "launched", None)

        torch.manual_seed(0)
        peer = timm.create_model("test_resnet", num_classes=10, drop_path_rate=0.3)
        peer.train()
        torch.manual_seed(1000 * r + 1)  # a different stochastic-depth draw per rank, the same for both syncs
        sync = make() if name == "coalesced" else OverlappedSync(bucket_mb=0.05)
        result = run(peer, sync, lambda step: nn.functional.cross_entropy(peer(images[step]), labels[step]))  # noqa: B023
        torch.save(result, out / f"timm.{name}.rank{r}.pt")
    torch.manual_seed(0)
    torch.save({k: v.detach().clone() for k, v in Branchy().named_parameters()}, out / f"branchy.initial.rank{r}.pt")
    (out / f"launched.rank{r}.json").write_text(json.dumps(launched))
