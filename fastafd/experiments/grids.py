"""Named sweep grids (``fastafd sweep --grid NAME``): recipes x seeds x overrides, and what they test.

A grid is data: the recipes to run, the default seeds, the ``fastafd train`` options applied to every
cell, and the claims (:mod:`fastafd.experiments.claims`) that ``fastafd report`` evaluates on its results. The
claims grids run the comparisons of docs/method.md's four claims: a small/large pair with every
method the claims compare (independent, dml, l1, afd, afd_shared), the small network's same-network
pair with afd and l1 (the "especially" of claim 1), and three copies of it with afd and independent
(claim 4) and dml (the logit term alone at K = 3).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from fastafd.errors import UserError
from fastafd.experiments import claims


@dataclass(frozen=True)
class Grid:
    """A named grid of runs."""

    name: str
    """``--grid`` name."""
    summary: str
    """One line: what it runs and how long it takes."""
    recipes: tuple[str, ...]
    """The recipes (names, not patterns), one row of the report each."""
    seeds: tuple[int, ...]
    """Default seeds (``--seeds`` replaces them)."""
    overrides: tuple[str, ...] = ()
    """``fastafd train`` options applied to every cell, before the ones given after ``--``."""
    claims: tuple[claims.Claim, ...] = ()
    """Comparisons the report evaluates on this grid's runs."""
    scope: str = ""
    """What the grid's results can and cannot say (printed above the claims in the report)."""


_DEMO_CLAIMS = claims.paper_claims("demo_resnet8_resnet20", "demo_resnet8", "demo_resnet8_k3")
_CIFAR_CLAIMS = claims.paper_claims("cifar100_resnet32_resnet110", "cifar100_resnet32", "cifar100_resnet32_k3")
_K3_DML = ("demo_resnet8_k3_dml", "cifar100_resnet32_k3_dml")
"""The K = 3 table's dml row (issue 27): the logit term alone next to independent and afd, no claim of its own."""

_DEMO_BRANCHED = ("demo_resnet8_one", "demo_resnet8_cl")
"""ONE and CL at demo size (three branches of ResNet-8): rows beside the claims' cells, no claim of their own."""
_CIFAR_SAME_ARCHITECTURE = tuple(f"cifar100_{net}_{m}" for net in ("resnet32", "resnet110", "wrn16_2", "wrn28_4")
                                 for m in ("independent", "dml", "one", "cl", "afd"))
"""The paper's same-architecture table: vanilla, DML, ONE, CL, AFD for ResNet-32, ResNet-110, WRN-16-2, WRN-28-4."""

GRIDS: dict[str, Grid] = {
    g.name: g
    for g in (
        Grid(
            name="claims-demo",
            summary="the four claims at demo size: ResNet-8 + ResNet-20, ResNet-8 pair, ResNet-8 x 3 on the built-in data, "
                    "3 epochs, 3 seeds, with the K = 3 dml row and ONE and CL rows (36 cells; the claims' 27 took 31 min on a shared 2-core CPU)",
            recipes=claims.recipes_of(_DEMO_CLAIMS) + _K3_DML[:1] + _DEMO_BRANCHED,
            seeds=(0, 1, 2),
            overrides=("--loop.epochs", "3"),
            claims=_DEMO_CLAIMS,
            scope="Demo size: 3,200 generated 32 px images of 10 classes, 3 epochs, ResNet-8 / ResNet-20 peers, on a CPU. "
                  "It checks that every comparison of the claims runs end to end and how large its difference is next to "
                  "the seed-to-seed spread. It does not reproduce the paper's CIFAR-100 numbers (300 epochs, ResNet-32/110, "
                  "WRNs): a verdict here says nothing about a claim at that scale, and `not resolved` means this scale cannot tell.",
        ),
        Grid(
            name="claims-cifar100",
            summary="the four claims at the paper's scale: ResNet-32 + ResNet-110, ResNet-32 pair, ResNet-32 x 3 on CIFAR-100, "
                    "300 epochs, 5 seeds, and the same-architecture table (vanilla, DML, ONE, CL, AFD on ResNet-32/110, WRN-16-2/28-4) "
                    "(pass --data DIR after --; a GPU cluster: --executor slurm)",
            recipes=tuple(dict.fromkeys(claims.recipes_of(_CIFAR_CLAIMS) + _K3_DML[1:] + _CIFAR_SAME_ARCHITECTURE)),
            seeds=(0, 1, 2, 3, 4),
            claims=_CIFAR_CLAIMS,
            scope="The paper's scale: CIFAR-100, 300 epochs, the mean of 5 runs per row (ResNet-32 / ResNet-110).",
        ),
    )
}


def get(name: str) -> Grid:
    """The grid called ``name``; an unknown name is a one-line :class:`UserError` listing the grids."""
    if name not in GRIDS:
        close = difflib.get_close_matches(name, GRIDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown grid '{name}': {hint}choose from {', '.join(GRIDS)} (or give --recipes)")
    return GRIDS[name]
