"""StepGuard's BatchNorm restore: a skipped iteration gets its statistics back exactly, a taken one keeps
them, on the host-read path (CPU) and the sync-free device path, whose cost must not grow per buffer."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastafd.steps import StepGuard

CPU = torch.device("cpu")


def bn_net(layers: int) -> nn.Module:
    return nn.Sequential(*[nn.BatchNorm2d(3) for _ in range(layers)]).train()


def guard_for(net: nn.Module, host_reads: bool) -> StepGuard:
    guard = StepGuard(CPU, buffers=list(net.buffers()))
    guard.host_reads = host_reads  # False: the path CUDA takes (no host read of the flag)
    return guard


def snapshot(net: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in net.buffers()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("host_reads", [True, False])
def test_a_skipped_iteration_restores_the_buffers_exactly_and_a_taken_one_keeps_them(host_reads):
    net = bn_net(4)
    guard = guard_for(net, host_reads)
    x = torch.randn(8, 3, 4, 4)
    before = snapshot(net)
    guard.begin()
    net(x)
    net[1].running_var.fill_(float("nan"))  # a non-finite step can poison the statistics: still restored exactly
    net[2].running_mean.fill_(float("inf"))
    guard.check(torch.tensor(float("nan")))
    guard.end()
    assert same(snapshot(net), before)
    assert int(guard.skipped) == 1

    guard.begin()
    net(x)
    after = snapshot(net)
    assert not same(after, before)
    guard.check(torch.tensor(1.0))
    guard.end()
    assert same(snapshot(net), after)
    assert int(net[0].num_batches_tracked) == 1  # integer buffers too


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_in_end(layers: int, skipped: bool) -> int:
    net = bn_net(layers)
    guard = guard_for(net, host_reads=False)
    guard.begin()
    net(torch.randn(2, 3, 2, 2))
    if skipped:
        guard.check(torch.tensor(float("nan")))
    with CountOps() as count:
        guard.end()
    return count.ops


def test_the_device_path_costs_the_same_few_ops_for_3_or_120_buffers():
    for skipped in (False, True):
        few, many = ops_in_end(1, skipped), ops_in_end(40, skipped)
        assert many == few, f"guard.end() dispatches {few} ops for 3 buffers but {many} for 120: a launch per buffer"
