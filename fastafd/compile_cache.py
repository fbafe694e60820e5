"""A persistent torch.compile cache per run, so that a restarted or requeued job skips most of its
cold compilation.

Inductor keeps its FX-graph cache, the AOTAutograd cache and the generated kernels (C++ on CPU,
Triton on CUDA) under ``TORCHINDUCTOR_CACHE_DIR``; its default lives in ``/tmp``, which on a cluster
is local to a node and wiped between jobs. Pointing it into the run folder (on the shared file
system the run writes anyway) lets a requeued job on another node reuse it. Measured by
``benchmarks/compile_cache.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def enable(path: Path) -> Path:
    """Use ``path`` for Inductor's and Triton's caches (call before the first compile)."""
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return path
