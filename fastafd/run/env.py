"""The environment a run or a benchmark records: the git commit, package versions, the CPU and the GPU. The one
place for them: ``env.json`` of a run folder (:func:`fastafd.run.rundir.create`), ``fastafd bench`` and every
script of ``benchmarks/``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PACKAGES = ("fastafd", "torch", "torchvision", "timm", "accelerate", "nvidia-dali-cuda130", "safetensors", "tyro", "numpy")
"""The packages a run folder's ``env.json`` records."""


def git_sha() -> str:
    """SHA of the fastafd checkout (``+dirty`` with uncommitted changes), or ``unknown`` for an installed wheel."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python's version and each installed distribution's (``not installed`` for one that is not)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _model_name() -> str:
    """The CPU's ``model name`` in ``/proc/cpuinfo`` ("" without one; OSError without the file)."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        name = _model_name()
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hardware(device: torch.device) -> dict:
    """Platform, processor, torch's thread count, the CPU's model name and, on CUDA, the GPU's name."""
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": torch.get_num_threads()}
    try:
        info["cpu"] = _model_name()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
