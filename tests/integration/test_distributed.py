"""Two and three CPU processes (gloo) under `accelerate launch` against one process with the same global batch,
with the coalesced and the overlapped gradient all-reduce."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.dist_worker import VARIANTS

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def launch(out: Path, processes: int, port: int, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests/integration/dist_worker.py"), str(out), *extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(f"{processes}-process run: {time.monotonic() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, free_port):
    return launch(tmp_path_factory.mktemp("dist2"), 2, free_port(), "compiled")


@pytest.fixture(scope="module")
def three_process_run(tmp_path_factory, free_port):
    return launch(tmp_path_factory.mktemp("dist3"), 3, free_port())


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _check(run: Path, variant: str, processes: int, mode: str = "") -> None:
    """``mode``: "" (eager) or "compiled." (the ranks' peers regionally compiled; the references stay eager)."""
    single = load(run / f"{variant}.single.pt")
    initial = load(run / f"{variant}.initial.pt")
    for sync in ("coalesced", "overlapped"):
        ranks = [load(run / f"{variant}.{mode}{sync}.rank{r}.pt") for r in range(processes)]
        assert all(r.keys() == single.keys() for r in ranks)
        for k in single:
            assert all(torch.equal(ranks[0][k], r[k]) for r in ranks[1:]), f"{variant}/{sync}: {k} differs between ranks"
        worst = max(((ranks[0][k] - single[k]).abs().max().item(), k) for k in single)
        # float sums in another order (per-rank means, then their mean); a wrong average would differ by ~1e-2
        assert worst[0] < 1e-4, f"{variant}/{sync}: {processes} processes vs 1 process, largest difference {worst[0]:.2e} in {worst[1]}"
        moved = [k for k in single if not torch.equal(ranks[0][k], initial[k])]
        assert len(moved) > len(single) // 2, f"{variant}: only {len(moved)} of {len(single)} parameters trained"
    launched = json.loads((run / f"{variant}.{mode}launched.json").read_text())
    if variant != "afd_simultaneous":  # gradients from autograd.grad there: nothing to overlap the logit/feature syncs with
        assert launched["during_backward"] > launched["after_backward"], launched  # most buckets went out while backward ran
    a, b = load(run / f"{variant}.{mode}coalesced.rank0.pt"), load(run / f"{variant}.{mode}overlapped.rank0.pt")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"{variant}: overlapped vs coalesced all-reduce differ by {worst:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run, variant):
    _check(two_process_run, variant, 2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_with_regionally_compiled_peers_match_one_eager_process(two_process_run, variant):
    _check(two_process_run, variant, 2, "compiled.")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_three_processes_match_one_process_with_the_same_global_batch(three_process_run, variant):
    _check(three_process_run, variant, 3)


def test_batchnorm_buffers_are_averaged_and_parameters_agree_in_training_mode(two_process_run):
    r0, r1 = load(two_process_run / "bn_train.rank0.pt"), load(two_process_run / "bn_train.rank1.pt")
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    differed = [k for k in r0["before"] if not torch.allclose(r0["before"][k], r1["before"][k])]
    assert differed, "each rank's BatchNorm statistics should differ before averaging (different data)"
    for k in r0["before"]:
        mean = (r0["before"][k] + r1["before"][k]) / 2
        assert torch.equal(r0["after"][k], r1["after"][k]), k
        torch.testing.assert_close(r0["after"][k], mean, rtol=1e-6, atol=1e-7, msg=k)


def test_a_parameter_without_gradient_on_one_rank_neither_hangs_nor_splits_the_ranks(two_process_run):
    unused_run = two_process_run
    """unused_worker.py, in the 2-process run: rank 1 skips a residual branch in some steps (with one parameter per bucket, the
    overlapped sync's buckets would otherwise start in another order there: different buckets summed), a
    layer no rank uses, and a timm peer with drop_path_rate > 0. Ranks agree exactly, the overlapped sync
    equals the coalesced reference, and the layer nobody used keeps no gradient (weight decay untouched)."""
    for model in ("branchy", "timm"):
        runs = {sync: [load(unused_run / f"{model}.{sync}.rank{r}.pt") for r in range(2)] for sync in ("coalesced", "overlapped")}
        for sync, (a, b) in runs.items():
            for k in a:
                assert torch.equal(a[k], b[k]), f"{model}/{sync}: {k} differs between ranks"
        a, b = runs["coalesced"][0], runs["overlapped"][0]
        worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
        assert worst[0] < 1e-6, f"{model}: overlapped vs coalesced differ by {worst[0]:.2e} in {worst[1]}"
        if model == "branchy":
            initial = load(unused_run / "branchy.initial.rank0.pt")
            assert torch.equal(a["unused.weight"], initial["unused.weight"])
            assert not torch.equal(a["branch.weight"], initial["branch.weight"])
    launched = json.loads((unused_run / "launched.rank1.json").read_text())["overlapped"]
    assert launched["during_backward"] > 0, launched  # the steps where rank 1 used every layer still overlapped
