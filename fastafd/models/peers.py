"""Peer networks: any timm model that gives feature maps (``forward_intermediates``), plus the CIFAR networks.

A peer k is split into its feature extractor G_k and its classifier (docs/method.md). The feature map
F_k is the output of the model's last stage in NCHW, as timm's ``forward_intermediates`` gives it:
for CNNs (ResNet, RegNet, ConvNeXt, MobileNet, EfficientNet, FastViT...) the last stage's output
(EfficientNet and FastViT: before their final 1x1 head convolution, which ``forward_features``
includes); for ViT/DeiT the last block's patch tokens reshaped to a (C, H/16, W/16) map (class and
register tokens dropped, before the final norm); for Swin the last stage's (H, W, C) tokens permuted
to NCHW. The logits come from the same forward pass (``forward_intermediates`` returns the final
features too, which ``forward_head`` turns into logits): one pass, not two.

Transformers are built for the run's image size (``img_size``), so a ViT trains at 64 px as at 224.
"""

from __future__ import annotations

import difflib

import timm
import torch
from torch import Tensor, nn

from fastafd.errors import UserError
from fastafd.models import cifar  # noqa: F401  (registers the CIFAR networks with timm)

FAMILIES_THAT_WORK = "resnet18, convnext_atto, efficientnet_b0, regnetx_002, vit_tiny_patch16_224, deit_small_patch16_224, swin_tiny_patch4_window7_224"
"""A few tested families, for the refusals' hints (docs/methods.md: the tested families)."""


def create_peer(name: str, num_classes: int, *, image_size: int, drop_rate: float = 0.0, pretrained: bool = False) -> nn.Module:
    """Build one peer with timm (for ``image_size`` when the model takes ``img_size``); a name timm does not
    know, or a model that gives no feature map, is a one-line :class:`UserError`."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for valid names"
        raise UserError(f"unknown model '{name}' in model.peers: {hint}")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **build_kwargs(name, image_size))
    for attr in ("forward_intermediates", "forward_head"):
        if not callable(getattr(model, attr, None)):
            raise UserError(f"model '{name}' cannot give a feature map (it has no {attr}() in timm): choose a model that does, "
                            f"e.g. {FAMILIES_THAT_WORK}")
    return model


def build_kwargs(name: str, image_size: int) -> dict:
    """The extra ``timm.create_model`` arguments fastafd builds ``name`` with: ``img_size`` for models whose
    constructor takes it (ViT, DeiT, Swin, LeViT, ...), so that they are built for the run's resolution;
    nothing for the others (CNNs take any size). ``export`` prints the same arguments in its load line.

    Whether a model takes ``img_size`` is found by building it on the meta device (no memory, no compute)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, num_classes=1, img_size=image_size)
    except TypeError as exc:
        if "img_size" in str(exc):
            return {}
        raise
    return {"img_size": image_size}


def features_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The last stage's feature map (NCHW) and the logits of ``model`` on ``x``, from one forward pass."""
    final, intermediates = model.forward_intermediates(x, indices=1, output_fmt="NCHW")
    return intermediates[-1], model.forward_head(final)


def features(model: nn.Module, x: Tensor) -> Tensor:
    """The last stage's feature map (NCHW) only: the forward stops there (no final norm or head)."""
    return model.forward_intermediates(x, indices=1, output_fmt="NCHW", intermediates_only=True, stop_early=True)[-1]


@torch.no_grad()
def feature_shape(model: nn.Module, image_size: int, name: str = "") -> tuple[int, int, int]:
    """(C, H, W) of the peer's feature map at ``image_size``, measured with one eval forward of batch 1
    (running BN statistics untouched); a model that cannot run at that size, or gives no (B, C, H, W) map,
    is a one-line :class:`UserError`."""
    name = name or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
        out, logits = features_and_logits(model, x)
    except (AssertionError, RuntimeError, NotImplementedError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model '{name}' cannot run at {image_size} px ({type(exc).__name__}: {first}): choose a --data.image_size "
                        f"the model supports (a multiple of 32 suits most), or another model, e.g. {FAMILIES_THAT_WORK}") from None
    finally:
        model.train(was_training)
    if out.dim() != 4:
        raise UserError(f"model '{name}' gives features of shape {tuple(out.shape)}, not a (B, C, H, W) map: choose a model "
                        f"with feature maps, e.g. {FAMILIES_THAT_WORK}")
    return (int(out.shape[1]), int(out.shape[2]), int(out.shape[3]))


def head_parameters(model: nn.Module) -> set[int]:
    """ids of the classifier's parameters (``get_classifier()``, which is a tuple of heads for distilled models
    such as LeViT and DeiT-distilled); the rest is the feature extractor G_k."""
    heads = model.get_classifier()
    return {id(p) for head in (heads if isinstance(heads, tuple) else (heads,)) for p in head.parameters()}


def feature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the feature extractor G_k: everything but the classifier (a final norm after the
    last stage, as in ViT, is in this set but gets no gradient from the feature-map loss)."""
    head = head_parameters(model)
    return [p for p in model.parameters() if id(p) not in head]
