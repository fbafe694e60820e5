"""What a first CUDA run would meet, reproduced on CPU through the same fused kernels and code paths:
optimizer state restored in the wrong memory format, a skipped first SGD step, non-finite gradients
behind a finite loss, and the discriminators' input layout."""

import copy
from dataclasses import replace

import pytest
import torch

from fastafd import state
from fastafd.checkpoint import store
from fastafd.metrics import RunningMeans
from fastafd.models.discriminator import DiscriminatorBank
from fastafd.optim import build_optimizer
from fastafd.steps import StepGuard
from tests.helpers import SGD, batches, iterate, tiny_config, tiny_task

PAIR = ("cifar_resnet8", "cifar_resnet8")
MIXED = ("cifar_resnet8", "cifar_wrn16_2")  # transfer layers with parameters (feature stage only)


class _NoLoader:
    """A training loader without a position (the in-memory batches of these tests)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        assert state == {}


def _checkpoint_and_restore(task, stages, cfg, tmp_path, channels_last):
    tensors, st = state.capture(task, stages, _NoLoader(), RunningMeans(), state.Position(1, 2, 2), {}, torch.device("cpu"))
    path = store.write(tmp_path, 2, tensors, st, keep=1)
    resumed, resumed_stages = tiny_task(cfg, seed=123, channels_last=channels_last)  # other initial weights: all must come from the file
    state.restore(store.load(path), resumed, resumed_stages, _NoLoader(), RunningMeans(), rank=0, world_size=1,
                  device=torch.device("cpu"), same_schedule=True)
    return resumed, resumed_stages


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_resume_continues_bitwise_with_optimizer_state_in_the_parameters_memory_format(channels_last, tmp_path):
    cfg = tiny_config(PAIR)
    data = batches(4, channels_last=channels_last)
    straight, straight_stages = tiny_task(cfg, channels_last=channels_last)
    iterate(straight, straight_stages, data)

    task, stages = tiny_task(cfg, channels_last=channels_last)
    iterate(task, stages, data[:2])
    resumed, resumed_stages = _checkpoint_and_restore(task, stages, cfg, tmp_path, channels_last)
    for stage in resumed_stages.values():
        for p in stage.params:
            for value in stage.optimizer.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert value.stride() == p.stride()
    iterate(resumed, resumed_stages, data[2:], start=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _device_skip_stepper(params, cfg):
    """An optimizer on the path CUDA takes (the fused kernel skips a flagged step itself); torch's CPU fused
    kernels read ``found_inf`` the same way."""
    opt = build_optimizer(params, cfg, cfg.lr, torch.device("cpu"), "fused")
    return opt, StepGuard(torch.device("cpu"))


def _guarded_step(opt, guard, params, grads, skip):
    guard.begin()
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    if skip:
        guard.found_inf.fill_(1.0)
    guard.step(opt, device_skip=True)
    guard.end()


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_skipped_first_sgd_step_leaves_no_trace_in_the_momentum(nesterov):
    torch.manual_seed(0)
    init = [torch.randn(64, 32), torch.randn(32)]
    g1, g2 = [torch.randn_like(t) for t in init], [torch.randn_like(t) for t in init]
    cfg = replace(SGD, nesterov=nesterov)

    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt, guard = _device_skip_stepper(params, cfg)
    _guarded_step(opt, guard, params, g1, skip=True)  # step 1 overflows (fp16) or has a NaN loss: skipped
    assert all(torch.equal(p, t) for p, t in zip(params, init))
    _guarded_step(opt, guard, params, g2, skip=False)

    fresh = [torch.nn.Parameter(t.clone()) for t in init]
    fresh_opt, fresh_guard = _device_skip_stepper(fresh, cfg)
    _guarded_step(fresh_opt, fresh_guard, fresh, g2, skip=False)  # a fresh optimizer taking only step 2
    for a, b in zip(params, fresh, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(params, fresh, strict=True):
        assert torch.equal(opt.state[a]["momentum_buffer"], fresh_opt.state[b]["momentum_buffer"])


def _snapshot(task, stages):
    params = {k: v.detach().clone() for k, v in task.state_dict().items()}
    opts = {n: copy.deepcopy(s.optimizer.state_dict()["state"]) for n, s in stages.items()}
    return params, opts


def _poison(param):
    """Make ``param``'s gradient non-finite whatever the loss: the loss itself stays finite."""
    return param.register_hook(lambda g: g * float("inf"))


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_inf_gradient_behind_a_finite_loss_skips_every_optimizer(order, dtype):
    task, stages = tiny_task(tiny_config(MIXED, order=order), dtype=dtype)
    data = batches(2)
    iterate(task, stages, data[:1])  # optimizer states exist
    before_params, before_opts = _snapshot(task, stages)
    hook = _poison(task.peers[0].conv1.weight)  # in the logit and the feature stage
    metrics = iterate(task, stages, data[1:], start=1)
    hook.remove()
    assert all(torch.isfinite(v).all() for v in metrics.values())  # every loss was finite
    after_params, after_opts = _snapshot(task, stages)
    for key, value in before_params.items():
        assert torch.equal(value, after_params[key]), key
    for name in stages:
        for pid, st in before_opts[name].items():
            for field, value in st.items():
                assert torch.equal(value, after_opts[name][pid][field]), (name, field)
    guard = stages.guard
    assert guard.skipped.item() == 1
    iterate(task, stages, data[:1], start=2)  # and the run goes on
    assert guard.skipped.item() == 1 and all(torch.isfinite(p).all() for p in task.parameters())


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_an_inf_gradient_of_the_feature_stage_only_skips_that_stage_and_counts(order):
    task, stages = tiny_task(tiny_config(MIXED, order=order))
    data = batches(2)
    iterate(task, stages, data[:1])
    transfer = next(p for p in task.transfers.parameters() if p.dim() == 4)  # trained by the feature stage only
    before = transfer.detach().clone()
    hook = _poison(transfer)
    iterate(task, stages, data[1:], start=1)
    hook.remove()
    assert torch.equal(transfer, before)
    assert stages.guard.skipped.item() == 1


def test_skip_flag_is_float32_whatever_the_default_dtype(float64):  # as the float64 reference tests run
    guard = StepGuard(torch.device("cpu"))
    assert guard.found_inf.dtype == torch.float32  # what the fused kernels and the AMP check read


def test_discriminator_bank_convolves_channels_last_maps_without_turning_them_into_nchw():
    k, c = 2, 16
    bank = DiscriminatorBank(c, k).to(memory_format=torch.channels_last)
    seen = []
    bank.conv1.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    maps = [torch.randn(4, c, 6, 6).contiguous(memory_format=torch.channels_last) for _ in range(k)]
    out = bank(maps)
    assert out.shape == (k, 4)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, bank(torch.stack(maps)))  # a stacked (K, B, C, H, W) tensor is the same input
