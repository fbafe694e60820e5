"""Processes and devices: HF accelerate sets up the process group (NCCL on GPUs, gloo on CPU).

fastafd uses accelerate for launching, the process group, device placement and collectives, but
does not hand its modules to ``accelerator.prepare``: an AFD iteration runs three optimizer stages
over different parameter subsets and two forward passes of the feature extractors, which DDP's
one-forward-one-backward reducer can only follow with ``find_unused_parameters``. Instead each
stage averages exactly its own gradients (:func:`all_reduce_grads`, one coalesced all-reduce per
stage), and BatchNorm running statistics are averaged over processes before every evaluation and
checkpoint (:func:`average_buffers`), so every rank holds the same model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fastafd.config import SystemConfig
from fastafd.errors import UserError


@dataclass
class Runtime:
    """Where and how this process runs."""

    accelerator: object  # accelerate.Accelerator
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    dtype: torch.dtype
    channels_last: bool
    compile: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup(cfg: SystemConfig) -> Runtime:
    """Create the accelerator and resolve the ``auto`` settings for this device."""
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("system.device=cuda but CUDA is not available: use --system.device auto or cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(cpu=not use_cuda)
    device = accelerator.device
    on_gpu = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if precision == "fp16" and not on_gpu:
        raise UserError("system.precision=fp16 needs a GPU: use fp32 or bf16 on CPU")
    return Runtime(
        accelerator=accelerator,
        device=device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        dtype=_DTYPES[precision],
        channels_last=cfg.channels_last == "on" or (cfg.channels_last == "auto" and on_gpu),
        compile=cfg.compile == "on" or (cfg.compile == "auto" and on_gpu),
    )


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` in place over all processes with one coalesced all-reduce."""
    if not tensors or not _distributed():
        return
    flat = _flatten_dense_tensors(tensors)
    tdist.all_reduce(flat)
    flat /= tdist.get_world_size()
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(synced)


def all_reduce_grads(params: Sequence[nn.Parameter], found_inf: torch.Tensor) -> None:
    """Average the gradients of ``params`` over all processes and OR the non-finite flag, in one
    coalesced all-reduce (the flag rides along as the last element)."""
    if not _distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors([*grads, found_inf.reshape(1).to(grads[0].dtype if grads else found_inf.dtype)])
    tdist.all_reduce(flat)
    found_inf.copy_((flat[-1] > 0).to(found_inf.dtype))
    flat = flat[:-1] / tdist.get_world_size()
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes."""
    _all_reduce_mean_([b for b in module.buffers() if b.is_floating_point()])


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum a dict of tensors over processes (evaluation counts)."""
    if not _distributed():
        return tensors
    out = {}
    for key, t in tensors.items():
        t = t.clone()
        tdist.all_reduce(t)
        out[key] = t
    return out
