"""The paper's four claims (docs/method.md) as computed comparisons between the cells of a sweep.

A claim is a signed sum of *terms*, each the final top-1 of one column (a peer, the ensemble, or the mean
of the peers) of one recipe; the claim says the sum is positive. Seeds pair the runs: with the same
``--system.seed`` every method starts its peers from the same weights and reads the same batches in
the same order, so the sum is formed per seed (over the seeds every term has finished) and its mean
and standard deviation over those seeds are the difference and its **seed spread**.

The verdict is computed, never written by hand:

* ``supported``: the mean difference is positive and larger than its seed spread;
* ``contradicted``: negative and larger in size than its seed spread;
* ``not resolved``: no larger than the seed spread, or fewer than 2 seeds finished every term (a
  difference smaller than the run-to-run variation is not a result at this scale).

Larger than one standard deviation of the per-seed differences is a weak bar (with 3 seeds, about a
one-sided t-test at 10 %); it separates "a difference the seeds agree on" from noise, which is
what a demo-size run can say, and no more.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

SUPPORTED, CONTRADICTED, NOT_RESOLVED = "supported", "contradicted", "not resolved"


@dataclass(frozen=True)
class Term:
    """``coef`` x the final top-1 of ``column`` of ``recipe``'s runs."""

    coef: int
    """+1 or -1."""
    recipe: str
    """Recipe name (the seeds are the sweep's)."""
    column: str
    """``peer0``, ``peer1``, ... (index in --model.peers), ``ensemble``, or ``peers`` (the mean of the peers' top-1)."""


@dataclass(frozen=True)
class Claim:
    """One comparison that one of the paper's claims predicts to be positive."""

    number: int
    """The claim of docs/method.md (1-4)."""
    statement: str
    """What the sum measures, in words (one line)."""
    terms: tuple[Term, ...]
    """The signed terms; the claim predicts their sum > 0."""


@dataclass(frozen=True)
class Verdict:
    """A claim evaluated on a sweep's finished runs."""

    claim: Claim
    seeds: tuple[int, ...]
    """Seeds at which every term has a finished run (the pairs the difference is formed over)."""
    mean: float | None
    """Mean over those seeds of the signed sum (top-1 points); None without any seed."""
    spread: float | None
    """Standard deviation over those seeds of the signed sum (the seed spread); None with fewer than 2 seeds."""
    verdict: str
    """supported, contradicted or not resolved (see the module docstring)."""
    reason: str
    """Why, in a few words (for the report)."""


def evaluate(claim: Claim, values: Mapping[tuple[str, str], Mapping[int, float]]) -> Verdict:
    """Evaluate ``claim`` on ``values[(recipe, column)] = {seed: final top-1}`` (finished runs only)."""
    per_term = [values.get((t.recipe, t.column), {}) for t in claim.terms]
    seeds = sorted(set.intersection(*(set(v) for v in per_term))) if per_term else []
    sums = [sum(t.coef * v[s] for t, v in zip(claim.terms, per_term, strict=True)) for s in seeds]
    mean = statistics.fmean(sums) if sums else None
    spread = statistics.stdev(sums) if len(sums) >= 2 else None
    if mean is None or spread is None:
        missing = [t.recipe for t, v in zip(claim.terms, per_term, strict=True) if len(v) < 2]
        why = f"fewer than 2 seeds finished every term ({', '.join(sorted(set(missing))) or 'seeds do not overlap'})"
        return Verdict(claim, tuple(seeds), mean, spread, NOT_RESOLVED, why)
    if abs(mean) <= spread or math.isclose(abs(mean), spread):
        return Verdict(claim, tuple(seeds), mean, spread, NOT_RESOLVED, f"|{mean:+.2f}| is within the seed spread {spread:.2f}")
    if mean > 0:
        return Verdict(claim, tuple(seeds), mean, spread, SUPPORTED, f"{mean:+.2f} exceeds the seed spread {spread:.2f}")
    return Verdict(claim, tuple(seeds), mean, spread, CONTRADICTED, f"{mean:+.2f} is below minus the seed spread {spread:.2f}")


def paper_claims(pair: str, same: str, k3: str) -> tuple[Claim, ...]:
    """The comparisons of the four claims for recipes named ``<prefix>_<method>``: ``pair`` a small/large pair
    (peer 0 the small network), ``same`` a pair of two copies of the small network, ``k3`` three of them."""

    def t(coef: int, prefix: str, method: str, column: str) -> Term:
        return Term(coef, f"{prefix}_{method}", column)

    return (
        Claim(1, "AFD beats L1 alignment on the small/large pair (mean of the peers)",
              (t(1, pair, "afd", "peers"), t(-1, pair, "l1", "peers"))),
        Claim(1, "AFD's lead over L1 is larger on the small/large pair than on the same-network pair (mean of the peers)",
              (t(1, pair, "afd", "peers"), t(-1, pair, "l1", "peers"), t(-1, same, "afd", "peers"), t(1, same, "l1", "peers"))),
        Claim(2, "AFD's small peer beats the small network trained alone (peer 0 over independent)",
              (t(1, pair, "afd", "peer0"), t(-1, pair, "independent", "peer0"))),
        Claim(2, "the small peer gains more from AFD than the large one (gain of peer 0 minus gain of peer 1, over independent)",
              (t(1, pair, "afd", "peer0"), t(-1, pair, "independent", "peer0"), t(-1, pair, "afd", "peer1"), t(1, pair, "independent", "peer1"))),
        Claim(3, "removing the adversarial term costs accuracy: AFD beats DML on the small/large pair (mean of the peers)",
              (t(1, pair, "afd", "peers"), t(-1, pair, "dml", "peers"))),
        Claim(3, "one shared optimizer for both losses is worse: AFD beats afd_shared on the small/large pair (mean of the peers)",
              (t(1, pair, "afd", "peers"), t(-1, pair, "afd_shared", "peers"))),
        Claim(4, "K = 3, cyclic (3 discriminators): AFD beats independent training (mean of the peers)",
              (t(1, k3, "afd", "peers"), t(-1, k3, "independent", "peers"))),
    )


def recipes_of(claims: tuple[Claim, ...]) -> tuple[str, ...]:
    """The recipes the claims compare, in first-use order (the cells a claims sweep must run)."""
    return tuple(dict.fromkeys(t.recipe for c in claims for t in c.terms))
