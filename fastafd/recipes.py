"""Named recipes: Python functions that return a :class:`TrainConfig`.

Variants derive from a few base recipes (``demo``, ``_cifar100``, ``_imagenet``); every recipe is one
command: ``fastafd train --recipe NAME [--data DIR] [overrides]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from fastafd import methods
from fastafd.config import (
    DataConfig,
    LoopConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    adam_feature_stage,
    sgd_logit_stage,
)
from fastafd.errors import UserError
from fastafd.methods import registry
from fastafd.models.cifar import CIFAR100_MEAN, CIFAR100_STD

RECIPES: dict[str, Callable[[], TrainConfig]] = {}



def recipe(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    """Register ``fn`` under its name."""
    RECIPES[fn.__name__] = fn
    return fn


def get(name: str) -> TrainConfig:
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, RECIPES, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `fastafd recipes` for the list"
        raise UserError(f"unknown recipe '{name}': {hint}")
    cfg = RECIPES[name]()
    cfg.recipe = name
    methods.validate(cfg)
    return cfg


def describe(name: str) -> str:
    return (RECIPES[name].__doc__ or "").strip().splitlines()[0]


# -- built-in data ------------------------------------------------------------------------------


@recipe
def demo() -> TrainConfig:
    """Default: two small ResNets distilled with AFD on the built-in demo images (about 1.5 min on an idle 2-core CPU; the run prints its own estimate)."""
    return TrainConfig(
        model=ModelConfig(peers=("cifar_resnet8", "cifar_resnet8")),
        method=MethodConfig(name="afd"),
        data=DataConfig(root=None, format="auto", batch_size=64, image_size=32, val_crop_ratio=1.0, scale=(0.35, 1.0)),
        optim=OptimConfig(name="sgd", lr=0.05, lr_batch_ref=0, weight_decay=5e-4, milestones=(0.5, 0.75)),
        adv_optim=replace(adam_feature_stage(), lr=2e-4),
        loop=LoopConfig(epochs=8, log_interval=10),
    )


def _demo(peers: tuple[str, ...], method: str) -> TrainConfig:
    """The demo recipe with other peers and another method (the demo-size comparisons of the claims sweep)."""
    cfg = demo()
    cfg.model = replace(cfg.model, peers=peers)
    cfg.method = _method(method)
    return cfg


def _method(name: str) -> MethodConfig:
    """The method's config as the recipes set it: its defaults, and the values its task asks for (CL: T = 2)."""
    return MethodConfig(name=name, **registry.get(name).recipe_defaults)  # type: ignore[arg-type]


_DEMO_PAIRS = {
    "resnet8": ("cifar_resnet8", "cifar_resnet8"),
    # small/large pair: ResNet-8 and ResNet-20 (same widths, 20 layers instead of 8; claims 1 and 2 at demo size)
    "resnet8_resnet20": ("cifar_resnet8", "cifar_resnet20"),
    # cyclic scheme with three peers (claim 4)
    "resnet8_k3": ("cifar_resnet8", "cifar_resnet8", "cifar_resnet8"),
}
"""Pairs on the built-in demo data with a recipe for every registered method: ``demo_<pair>_<method>``."""


# -- CIFAR-100 (paper, Tables 1-4) ------------------------------------------------------------------


def _cifar100(peers: tuple[str, ...], method: str) -> TrainConfig:
    """Paper's CIFAR-100 schedule: batch 128, 300 epochs; SGD lr 0.1 x0.1 at 150/225; Adam 2e-5 x0.1 at 75/150.

    --data points at the standard cifar-100-python archive folder (or its parent); fine labels,
    pad-4 random 32x32 crop + flip + normalize in DALI (the paper's augmentation).
    """
    return TrainConfig(
        model=ModelConfig(peers=peers, num_classes=100),
        method=_method(method),
        data=DataConfig(format="cifar100", batch_size=128, image_size=32, crop_padding=4, mean=CIFAR100_MEAN, std=CIFAR100_STD),
        optim=OptimConfig(name="sgd", lr=0.1, lr_batch_ref=0, momentum=0.9, weight_decay=1e-4, milestones=(0.5, 0.75)),
        adv_optim=OptimConfig(name="adam", lr=2e-5, lr_batch_ref=0, weight_decay=0.1, milestones=(0.25, 0.5)),
        loop=LoopConfig(epochs=300),
    )


def _register(name: str, build: Callable[[tuple[str, ...], str], TrainConfig], peers: tuple[str, ...], method: str, doc: str) -> None:
    """Register the recipe ``name`` = ``build(peers, method)``."""

    def fn() -> TrainConfig:
        return build(peers, method)

    fn.__name__ = name
    fn.__doc__ = doc
    recipe(fn)


_CIFAR_PAIRS = {
    "resnet32": ("cifar_resnet32", "cifar_resnet32"),
    "resnet110": ("cifar_resnet110", "cifar_resnet110"),
    "wrn16_2": ("cifar_wrn16_2", "cifar_wrn16_2"),
    "wrn16_4": ("cifar_wrn16_4", "cifar_wrn16_4"),
    "wrn28_4": ("cifar_wrn28_4", "cifar_wrn28_4"),
    # mixed small/large pairs (claim 2: the small network gains the most)
    "resnet32_resnet110": ("cifar_resnet32", "cifar_resnet110"),
    "wrn16_2_wrn28_4": ("cifar_wrn16_2", "cifar_wrn28_4"),
    "resnet32_wrn28_4": ("cifar_resnet32", "cifar_wrn28_4"),
    # a CNN with a transformer: 64x8x8 ResNet maps against a ViT's 384 channels of 4x4 patch tokens (8 px patches at 32 px)
    "resnet32_vits8": ("cifar_resnet32", "vit_small_patch8_224"),
    # cyclic scheme (claim 4)
    "resnet32_k3": ("cifar_resnet32", "cifar_resnet32", "cifar_resnet32"),
    "wrn16_2_k3": ("cifar_wrn16_2", "cifar_wrn16_2", "cifar_wrn16_2"),
}
_COMPARED = ("resnet32", "resnet32_resnet110", "wrn16_2_wrn28_4", "resnet32_k3")
"""CIFAR pairs with a recipe for every registered method (the paper's comparison tables); the others have AFD only."""


_SAME_ARCHITECTURE = ("resnet32", "resnet110", "wrn16_2", "wrn28_4")
"""The paper's same-architecture table (vanilla, DML, ONE, CL, AFD): each network's pair (and, for the
multi-branch methods, three branches of it) has a recipe for each of those methods."""

BRANCHES = 3
"""Branches of the multi-branch methods' recipes (ONE's and CL's papers' default)."""


def _method_doc(method: str) -> str:
    return registry.get(method).summary


_PAIRED = tuple(m for m in registry.names() if not registry.get(m).same_architecture)
"""Methods of peer networks; the others (one, cl) branch one network and get their own recipes below."""
BRANCHED = tuple(m for m in registry.names() if registry.get(m).same_architecture)

for _pair, _peers in _DEMO_PAIRS.items():
    for _m in _PAIRED:
        _register(f"demo_{_pair}_{_m}", _demo, _peers, _m, f"Demo data, {' + '.join(_peers)}: {_method_doc(_m)}.")
for _m in BRANCHED:
    _register(f"demo_resnet8_{_m}", _demo, ("cifar_resnet8",) * BRANCHES, _m,
              f"Demo data, cifar_resnet8 with {BRANCHES} branches: {_method_doc(_m)}.")

for _pair, _peers in _CIFAR_PAIRS.items():
    for _m in _PAIRED if _pair in _COMPARED else ("independent", "dml", "afd") if _pair in _SAME_ARCHITECTURE else ("afd",):
        _register(f"cifar100_{_pair}_{_m}", _cifar100, _peers, _m, f"CIFAR-100, {' + '.join(_peers)}: {_method_doc(_m)}.")
for _pair in _SAME_ARCHITECTURE:
    for _m in BRANCHED:
        _net = _CIFAR_PAIRS[_pair][0]
        _register(f"cifar100_{_pair}_{_m}", _cifar100, (_net,) * BRANCHES, _m,
                  f"CIFAR-100, {_net} with {BRANCHES} branches: {_method_doc(_m)}.")


# -- ImageNet (paper, Table 5; schedule ours, scaled from CIFAR) ----------------------------------


def _imagenet(peers: tuple[str, ...], method: str) -> TrainConfig:
    """90 epochs, batch 256; SGD lr 0.1 x batch/256, x0.1 at 1/3, 2/3, 8/9; Adam 2e-5, x0.1 at 1/4 and 1/2."""
    return TrainConfig(
        model=ModelConfig(peers=peers, num_classes=1000),
        method=_method(method),
        data=DataConfig(format="folder", batch_size=256, image_size=224),
        optim=sgd_logit_stage(),
        adv_optim=adam_feature_stage(),
        loop=LoopConfig(epochs=90),
    )


for _m in _PAIRED:
    _register(f"imagenet_resnet18_{_m}", _imagenet, ("resnet18", "resnet18"), _m, f"ImageNet, resnet18 + resnet18: {_method_doc(_m)}.")
for _m in BRANCHED:
    _register(f"imagenet_resnet18_{_m}", _imagenet, ("resnet18",) * BRANCHES, _m,
              f"ImageNet, resnet18 with {BRANCHES} branches: {_method_doc(_m)}.")
for _big in ("resnet34", "resnet50"):
    for _m in ("afd", "l1"):
        _register(f"imagenet_resnet18_{_big}_{_m}", _imagenet, ("resnet18", _big), _m, f"ImageNet, resnet18 + {_big}: {_method_doc(_m)}.")
for _m in ("afd", "l1"):  # a CNN with a transformer: 2048x7x7 ResNet-50 maps against DeiT-S's 384x14x14 patch tokens
    _register(f"imagenet_resnet50_deit_small_{_m}", _imagenet, ("resnet50", "deit_small_patch16_224"), _m,
              f"ImageNet, resnet50 + deit_small_patch16_224: {_method_doc(_m)}.")
_register("imagenet_resnet34_afd", _imagenet, ("resnet34", "resnet34"), "afd", f"ImageNet, resnet34 + resnet34: {_method_doc('afd')}.")
