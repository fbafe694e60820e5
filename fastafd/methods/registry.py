"""The method registry: the one place that knows which methods exist.

A method is a :class:`~fastafd.methods.base.Task` subclass registered with :func:`register`; its
class attributes say everything the rest of fastafd needs (the name, a one-line summary, whether it
needs two or more peers, which optimizer configs its stages use, which losses to display, its
evaluation extras). Config validation (:func:`validate`: ``method.name``, K >= 2), the CLI choices and help, ``fastafd methods``,
the recipes and the config reference read them from here. Adding a method is one module under
``fastafd/methods/`` that defines its task with ``@register`` (every module of the package is
imported on first use of the registry), and its tests. A method defined outside fastafd is a module that
does the same, named in the ``fastafd.methods`` entry point group of its package (``[project.entry-points."fastafd.methods"]
name = "module"``): the registry imports it with fastafd's own, so the CLI, the recipes, sweeps and reports see it.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from fastafd.errors import UserError, unknown_name

if TYPE_CHECKING:
    from fastafd.config import TrainConfig
    from fastafd.methods.base import Task

ENTRY_POINTS = "fastafd.methods"
"""Entry point group of methods defined by other packages (each entry: a module that registers its task)."""

_INFRASTRUCTURE = ("base", "branched", "registry")
"""Modules of this package that define no method."""

_METHODS: dict[str, type[Task]] = {}
_loaded = False


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` selectable as ``--method.name <cls.method>``."""
    if cls.method in _METHODS and _METHODS[cls.method] is not cls:
        raise ValueError(f"method {cls.method!r} is registered twice ({_METHODS[cls.method].__qualname__}, {cls.__qualname__})")
    if not cls.summary:
        raise ValueError(f"method {cls.method!r} ({cls.__qualname__}) needs a one-line summary")
    _METHODS[cls.method] = cls
    return cls


def _load() -> dict[str, type[Task]]:
    global _loaded
    if not _loaded:
        _loaded = True
        package = importlib.import_module("fastafd.methods")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if info.name not in _INFRASTRUCTURE:
                importlib.import_module(f"fastafd.methods.{info.name}")
        for ep in entry_points(group=ENTRY_POINTS):
            importlib.import_module(ep.value)
    return dict(sorted(_METHODS.items()))


def names() -> tuple[str, ...]:
    """Registered method names, sorted."""
    return tuple(_load())


def get(name: str) -> type[Task]:
    """The task class of ``name``; an unknown name is a one-line :class:`UserError` with close matches."""
    methods = _load()
    if name not in methods:
        raise unknown_name("method", name, methods, f"choose from {', '.join(methods)} (`fastafd methods` describes them)")
    return methods[name]


def validate(cfg: TrainConfig) -> None:
    """Check what config cannot check alone (it does not know the methods): ``method.name`` is registered, and a
    method that distills between peers has K >= 2 of them. A one-line :class:`UserError` otherwise. Called by the
    argument parser, the recipes and task construction."""
    cls = get(cfg.method.name)
    if cls.needs_pair and cfg.model.k < 2:
        raise UserError(
            f"method {cfg.method.name} distills between peers but model.peers has {cfg.model.k}: "
            f"give K >= 2 names, e.g. --model.peers {cfg.model.peers[0]} {cfg.model.peers[0]}"
        )
    cls.check(cfg)  # what the method itself refuses (ONE/CL: branches of different networks)


def describe() -> list[str]:
    """One line per method: name, summary, stages' optimizers, whether it needs a pair (``fastafd methods``)."""
    methods = _load()
    width = max(map(len, methods))
    out = []
    for name, cls in methods.items():
        optims = " + ".join(cls.optimizers)
        need = "; K >= 2 branches: --model.peers names one network K times" if cls.same_architecture else "; K >= 2 peers" if cls.needs_pair else ""
        out.append(f"{name:<{width}}  {cls.summary} [{optims}{need}]")
    return out
