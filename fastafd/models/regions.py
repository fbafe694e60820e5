"""Regional compilation: each repeated block of a peer compiled on its own (torchtitan's per-block compile).

A ``torch.compile`` d function is one autograd node in the backward (``CompiledFunctionBackward``): every
gradient it produces is accumulated when the whole node is done. Compiling a whole peer therefore makes
all its parameters' post-accumulate-grad hooks fire at the end of its backward, and the overlapped
all-reduce (:mod:`fastafd.comm`) has nothing left to hide behind. Compiled block by block, each block's
backward is its own node: the gradients of the last blocks are ready (and their buckets on the wire)
while the earlier blocks are still in backward, as in eager mode. Blocks of one structure and shape
share one compiled graph, so a ViT's twelve blocks compile once (time to first step, whole against
regional: ``benchmarks/compile_time.py``).

The blocks are timm's repeated containers: ``blocks[i]`` (ViT, DeiT, EfficientNet, MobileNet),
``stages[i]`` (ConvNeXt, FastViT, ...), ``layers[i]`` (Swin), ``layerN`` (ResNet and the CIFAR nets),
``sN`` (RegNet); a model with none of these has each top-level child with parameters compiled on its
own. Stems, heads and norms in between run eager. A compiled block runs compiled in training mode
only: evaluation uses the eager block, as the whole-peer scope's eval does (no recompile at the
train/eval switch).
"""

from __future__ import annotations

import itertools
import types

import torch
from torch import nn

_CONTAINERS = ("blocks", "stages", "layers")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that regional compilation compiles one by one (module docstring)."""
    for attr in _CONTAINERS:
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential | nn.ModuleList) and len(seq) > 0:
            return list(seq)
    for prefix in ("layer", "s"):
        numbered = list(itertools.takewhile(lambda m: isinstance(m, nn.Module),
                                            (getattr(model, f"{prefix}{i}", None) for i in itertools.count(1))))
        if numbered:
            return numbered
    return [m for m in model.children() if any(True for _ in m.parameters())]


def _calls(eager):
    def forward(*args, **kwargs):
        return eager(*args, **kwargs)

    return forward


_CODES: dict[tuple, types.CodeType] = {}
"""One code object per block signature (class, parameter and buffer shapes): dynamo caches compiled graphs per
code object, so blocks of one signature share one graph (a ViT's blocks compile once) while blocks of
another shape (ResNet's stages) get their own instead of a recompile (and automatic dynamic shapes)."""


def _signature(block: nn.Module) -> tuple:
    tensors = itertools.chain(block.named_parameters(), block.named_buffers())
    return (type(block).__qualname__, tuple((n, tuple(t.shape), t.dtype) for n, t in tensors))


def compile_block(block: nn.Module, backend: str = "inductor", share: str = "") -> None:
    """Make ``block`` run its ``torch.compile`` d forward in training mode (its own autograd node), eager in eval.

    Blocks share a compiled graph only with blocks of the same signature and the same ``share`` key: a
    graph whose first backward did not retain it donates its saved buffers and cannot then be
    back-propagated twice (AFD's simultaneous order does, ``retain_graph``), so such tasks pass their own key."""
    eager = block.forward
    calls = _calls(eager)
    key = (share, *_signature(block))
    code = _CODES.setdefault(key, calls.__code__.replace(co_name=f"regional_block_{len(_CODES)}"))
    calls = types.FunctionType(code, calls.__globals__, code.co_name, None, calls.__closure__)
    compiled = torch.compile(calls, backend=backend)

    def forward(*args, **kwargs):
        return (compiled if block.training else eager)(*args, **kwargs)

    block.forward = forward  # an instance attribute: the state dict and the module's class stay as they are


def own_code(method, share: str):
    """``method`` (a bound method) with a code object of its own per ``share`` key, so that dynamo compiles it
    apart from the same method of tasks with another key (:func:`compile_block`); unchanged for ``""``."""
    if not share:
        return method
    func = method.__func__
    code = _CODES.setdefault((share, func.__code__), func.__code__.replace(co_name=f"{func.__name__}_{share}"))
    copy = types.FunctionType(code, func.__globals__, code.co_name, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return types.MethodType(copy, method.__self__)


def compile_regions(model: nn.Module, backend: str = "inductor", share: str = "") -> list[nn.Module]:
    """Compile every repeated block of ``model`` on its own (:func:`compile_block`); returns the blocks."""
    blocks = repeated_blocks(model)
    for block in blocks:
        compile_block(block, backend, share)
    return blocks
