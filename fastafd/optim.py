"""Optimizers and learning-rate schedules of the stages (SGD for logits, Adam for the feature-map game)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from timm.scheduler import MultiStepLRScheduler
from torch import nn

from fastafd.comm import GradSync, LocalSync
from fastafd.config import OptimConfig, TrainConfig
from fastafd.errors import UserError
from fastafd.methods.base import Task
from fastafd.steps import Stage, Stages, StepGuard


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``lr * global_batch / lr_batch_ref`` when ``lr_batch_ref`` is set (linear scaling rule), else ``lr``."""
    return cfg.lr * global_batch / cfg.lr_batch_ref if cfg.lr_batch_ref else cfg.lr

def param_groups(params: Sequence[nn.Parameter], cfg: OptimConfig) -> list[dict]:
    """One group, or two split by tensor rank when 1-d parameters (biases, norms) get no weight decay."""
    if cfg.decay_1d:
        return [{"params": list(params), "weight_decay": cfg.weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]

def _apex_optimizers() -> object:
    try:
        import apex.optimizers  # type: ignore[import-not-found]
    except ImportError:
        raise UserError("system.optimizer_impl=apex but NVIDIA apex is not importable: use auto (torch's fused optimizers)") from None
    return apex.optimizers


def build_optimizer(
    params: Sequence[nn.Parameter], cfg: OptimConfig, lr: float, device: torch.device, impl: str = "auto"
) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW. ``auto``: torch's fused kernels on CUDA and CPU (on CUDA they also skip a
    flagged step on the device, see ``StepGuard``; on a 2-core CPU they made Adam 6.3x and SGD 2.6x
    faster than foreach for two ResNet-18s: benchmarks/results/optimizers.md), the multi-tensor (foreach)
    implementation elsewhere."""
    groups = param_groups(params, cfg)
    if impl == "apex":
        apex = _apex_optimizers()
        if cfg.name == "sgd":
            return apex.FusedSGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        return apex.FusedAdam(groups, lr=lr, betas=cfg.betas, adam_w_mode=cfg.name == "adamw")
    fused = impl == "fused" or (impl == "auto" and device.type in ("cuda", "cpu"))
    kw = {"fused": True} if fused else {"foreach": True}
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kw)
        init_momentum(opt)
    else:
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=lr, betas=cfg.betas, **kw)
    return opt


def device_skip(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether ``optimizer`` skips a flagged step itself: torch's fused kernels read ``found_inf``, so no step
    reads the flag on the host (a :class:`~fastafd.steps.Stage`'s ``device_skip``)."""
    return isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults.get("fused") is True and fused_kernels_skip(device.type)


def init_momentum(opt: torch.optim.SGD) -> None:
    """Create SGD's momentum buffers as zeros now, in each parameter's memory format.

    torch creates them lazily at the first step, and its fused kernel makes them with ``empty_like``
    and fills them in the kernel: when that first step is skipped on the device (``found_inf``: an
    fp16 overflow, a non-finite step-1 loss), the kernel returns early and the uninitialised memory
    becomes the momentum (seen: parameters near 1e18 one step later). With zero buffers the first
    step computes ``0 * momentum + grad = grad``, bitwise what the lazy first step stores (no dampening).
    """
    for group in opt.param_groups:
        if not group["momentum"]:
            continue
        for p in group["params"]:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@functools.cache
def fused_kernels_skip(device_type: str) -> bool:
    """Whether torch's fused SGD and Adam on ``device_type`` skip a step given ``found_inf = 1``.

    True on CUDA (the kernels' contract); on CPU probed once on two one-element parameters, because
    the CPU kernels gained the check later than the CUDA ones (torch 2.14: both skip).
    """
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    flag = torch.ones((), dtype=torch.float32)
    for make in (lambda p: torch.optim.SGD([p], lr=1.0, momentum=0.9, fused=True), lambda p: torch.optim.Adam([p], lr=1.0, fused=True)):
        p = nn.Parameter(torch.ones(1))
        p.grad = torch.ones(1)
        opt = make(p)
        if isinstance(opt, torch.optim.SGD):
            init_momentum(opt)
        opt.found_inf, opt.grad_scale = flag, None
        try:
            opt.step()
        except (RuntimeError, TypeError):
            return False
        if not torch.equal(p.detach(), torch.ones(1)):
            return False
    return True


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> MultiStepLRScheduler:
    """Step schedule in optimizer steps: x gamma at each milestone (a fraction of all training steps,
    so 1/3 of 90 epochs is the start of epoch 31), optional linear warm-up. ``scheduler.step_update(i)`` before step ``i``.

    timm decays once ``t + 1 >= decay_t``; passing ``milestone + 1`` makes step ``milestone`` the first
    decayed one.
    """
    milestones = [max(1, round(m * epochs * steps_per_epoch)) for m in cfg.milestones]
    return MultiStepLRScheduler(
        optimizer,
        decay_t=[m + 1 for m in milestones],
        decay_rate=cfg.gamma,
        warmup_t=round(cfg.warmup_epochs * steps_per_epoch),
        warmup_lr_init=0.0,
        t_in_epochs=False,
    )

def build_stages(
    task: Task,
    cfg: TrainConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    steps_per_epoch: int,
    grad_sync: GradSync | None = None,
) -> Stages:
    """One :class:`Stage` (optimizer + schedule) per stage the method asks for, all sharing one
    :class:`StepGuard` (fp16 loss scale when ``dtype`` is float16; the task's buffers restored on a skip)."""
    guard = StepGuard(device, fp16=dtype == torch.float16, buffers=list(task.buffers()))
    stages = {}
    for name, spec in task.stages().items():
        ocfg = getattr(cfg, spec.optim)  # one of config.OPTIMIZER_SLOTS
        opt = build_optimizer(spec.params, ocfg, scaled_lr(ocfg, cfg.data.batch_size), device, cfg.system.optimizer_impl)
        sched = build_scheduler(opt, ocfg, cfg.loop.epochs, steps_per_epoch)
        stages[name] = Stage(name, list(spec.params), opt, sched, guard, grad_sync or LocalSync(), device_skip=device_skip(opt, device))
    return Stages(stages, guard)
