"""CIFAR networks of the AFD paper, registered with timm.

Importing this module registers the 32x32-input networks used in

    Chung, Park, Kim, Kwak. "Feature-map-level Online Adversarial Knowledge
    Distillation." ICML 2020 (arXiv:2002.01775),

so that ``timm.create_model(name, num_classes=N)`` builds them like any other timm model:

* CIFAR ResNet -- He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition."
  CVPR 2016 (arXiv:1512.03385), section 4.2: a 3x3 conv with 16 channels, then three stages of
  n basic blocks with 16/32/64 channels at strides 1/2/2, global average pooling and a linear
  classifier; depth = 6n + 2.  Registered: ``cifar_resnet8/14/20/32/44/56/110``.
* Wide ResNet WRN-d-k -- Zagoruyko, Komodakis. "Wide Residual Networks." BMVC 2016
  (arXiv:1605.07146): a 3x3 conv with 16 channels, then three stages of n = (d - 4) / 6
  pre-activation wide basic blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) with
  16k/32k/64k channels at strides 1/2/2, then BN + ReLU, global average pooling and a linear
  classifier.  Registered: ``cifar_wrn16_1, cifar_wrn16_2, cifar_wrn16_4, cifar_wrn28_4,
  cifar_wrn40_2``.

Variant choices that are ours (the papers leave them open or the AFD code differs):

* ResNet shortcut: where the shape changes, a 1x1 conv (stride 2) + BN projection, as in the
  usual knowledge-distillation code bases (e.g. RepDistiller, CRD), not He et al.'s
  parameter-free option A (zero-padded identity).  This adds 2,752 parameters (0.6%) to every
  depth (ResNet-32 with 10 classes: 466,906 vs. 464,154 with option A, reported as 0.46M).
* WRN shortcut: a 1x1 conv without BN applied to the *pre-activated* input wherever the
  shape changes (stride != 1 or channels change), as in the authors' reference code.  The
  in-block dropout is the ``block_drop_rate`` argument (default 0); ``drop_rate`` is timm's
  dropout before the classifier (default 0) for both families.  No drop-path.
* Initialisation: Kaiming normal (fan_out, ReLU) for every conv, BN weight 1 / bias 0,
  linear layer PyTorch's default weight init with a zero bias.  No zero-init of the last BN.
* timm interface: ``forward_features`` returns the last feature map before pooling (for the
  WRN: after the final BN + ReLU), (N, C, 8, 8) at 32x32 input; ``feature_info`` lists the
  three stages (reductions 1, 2, 4); for the WRN the last entry points at the final ReLU
  (``act``) so that it equals ``forward_features``, the first two at the stage outputs.
  Gradient checkpointing (``set_grad_checkpointing``) checkpoints every block.
* Default pretrained cfg: 32x32 input, CIFAR-100 mean/std, 100 classes, no weight URL (none is
  published).  Local weights load with ``pretrained=True,
  pretrained_cfg_overlay=dict(file=...)``.  Unlike stock timm, a local file/state_dict loaded
  that way is taken to have the head of the model being built: when ``num_classes`` > 0 is
  given and the overlay does not name its own ``num_classes``, the overlay gets the model's
  ``num_classes``, so the classifier is loaded rather than silently dropped.  To load a
  checkpoint with a different head (transfer), name the checkpoint's ``num_classes`` in the
  overlay and timm discards its classifier as usual.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models._builder import build_model_with_cfg
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model
from torch import nn

__all__ = ['CifarResNet', 'WideResNet', 'CIFAR100_MEAN', 'CIFAR100_STD']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_STAGE_STRIDES = (1, 2, 2)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _CifarNetBase(nn.Module):
    """timm head / classifier plumbing shared by both families (attributes set by subclasses)."""

    def _run_stages(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        return self.layer3(self.layer2(self.layer1(x)))

    def _make_head(self, num_classes: int, global_pool: str, **dd) -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        _init_weights(self.fc)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` (0: identity); ``global_pool=None`` keeps the current pooling."""
        dd = get_device_dtype(self)
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self._make_head(num_classes, global_pool, **dd)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, List[int], None] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature interface: the outputs of the three stages (``indices``: the last n, or a list of
        stage indexes); the last stage's as ``forward_features`` returns it (WRN: after its final norm and
        activation). Returns ``(final features, intermediates)``, or the intermediates only."""
        assert output_fmt == 'NCHW', 'the CIFAR networks give NCHW maps only'
        take = list(range(3))[-indices:] if isinstance(indices, int) else list(range(3)) if indices is None else list(indices)
        out: List[torch.Tensor] = []
        x = self._stem(x)
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3)):
            x = stage(x)
            if i == 2:
                x = self._finish(x)
            if i in take:
                out.append(x)
            if stop_early and intermediates_only and i >= max(take):
                break
        return out if intermediates_only else (x, out)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the last stage in ``forward_features`` (WRN: norm + activation)."""
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, section 4.2)
# --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU (post-activation, as in He et al. 2016)."""

    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd),
                nn.BatchNorm2d(out_chs, **dd),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(_CifarNetBase):
    """ResNet-(6n+2) for 32x32 inputs: stem conv3x3(16)-BN-ReLU, stages ``layer1..3``, avg pool, ``fc``."""

    def __init__(
            self,
            depth: int = 32,
            num_classes: int = 100,
            in_chans: int = 3,
            widths: Sequence[int] = (16, 32, 64),
            stem_width: int = 16,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f'CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}')
        if len(widths) != 3:
            raise ValueError(f'CIFAR ResNet has three stages, got widths={tuple(widths)}')
        dd = {'device': device, 'dtype': dtype}
        n = (depth - 2) // 6
        self.depth = depth
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_width, **dd)
        self.act1 = nn.ReLU(inplace=True)

        self.feature_info = []
        in_chs, net_stride = stem_width, 1
        for i, (width, stride) in enumerate(zip(widths, _STAGE_STRIDES)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_chs, width, stride if j == 0 else 1, **dd))
                in_chs = width
            net_stride *= stride
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=net_stride, module=f'layer{i + 1}'))

        self.num_features = in_chs
        self._make_head(num_classes, global_pool, **dd)
        _init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|^bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_stages(self._stem(x))


# --------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016)
# --------------------------------------------------------------------------------------------

class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, + shortcut.

    Where the shape changes the shortcut is a 1x1 conv applied to the pre-activated input.
    """

    def __init__(
            self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0., device=None, dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(preact)
        x = self.conv1(preact)
        x = self.drop(self.act2(self.bn2(x)))
        x = self.conv2(x)
        return x + shortcut


class WideResNet(_CifarNetBase):
    """WRN-d-k for 32x32 inputs: stem conv3x3(16), stages ``layer1..3``, ``norm`` + ``act``, avg pool, ``fc``."""

    def __init__(
            self,
            depth: int = 16,
            widen_factor: int = 2,
            num_classes: int = 100,
            in_chans: int = 3,
            stem_width: int = 16,
            drop_rate: float = 0.,
            block_drop_rate: float = 0.,
            global_pool: str = 'avg',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f'WRN depth must be 6n+4 with n >= 1, got {depth}')
        if widen_factor < 1:
            raise ValueError(f'WRN widen_factor must be >= 1, got {widen_factor}')
        dd = {'device': device, 'dtype': dtype}
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth = depth
        self.widen_factor = widen_factor
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.block_drop_rate = block_drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False, **dd)

        self.feature_info = []
        in_chs, net_stride = stem_width, 1
        for i, (width, stride) in enumerate(zip(widths, _STAGE_STRIDES)):
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_chs, width, stride if j == 0 else 1, block_drop_rate, **dd))
                in_chs = width
            net_stride *= stride
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            # the last stage's feature is taken after the final BN + ReLU (== forward_features)
            module = f'layer{i + 1}' if i < len(widths) - 1 else 'act'
            self.feature_info.append(dict(num_chs=width, reduction=net_stride, module=module))

        self.norm = nn.BatchNorm2d(in_chs, **dd)
        self.act = nn.ReLU(inplace=True)

        self.num_features = in_chs
        self._make_head(num_classes, global_pool, **dd)
        _init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1',
            blocks=[
                (r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self._run_stages(self._stem(x)))


# --------------------------------------------------------------------------------------------
# timm registration
# --------------------------------------------------------------------------------------------

def _create(model_cls: Type[nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    if pretrained:
        # A local checkpoint given through the overlay is taken to carry this model's head: without
        # this, timm compares num_classes with the cfg's 100 and silently drops the classifier.
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        num_classes = kwargs.get('num_classes')
        if (
                ('file' in overlay or 'state_dict' in overlay)
                and 'num_classes' not in overlay
                and num_classes is not None and num_classes > 0
        ):
            kwargs['pretrained_cfg_overlay'] = dict(overlay, num_classes=num_classes)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        **kwargs,
    }


_RESNET_DEPTHS = {'cifar_resnet8': 8, 'cifar_resnet14': 14, 'cifar_resnet20': 20, 'cifar_resnet32': 32,
                  'cifar_resnet44': 44, 'cifar_resnet56': 56, 'cifar_resnet110': 110}
_WRN_ARGS = {'cifar_wrn16_1': (16, 1), 'cifar_wrn16_2': (16, 2), 'cifar_wrn16_4': (16, 4),
             'cifar_wrn28_4': (28, 4), 'cifar_wrn40_2': (40, 2)}

default_cfgs = generate_default_cfgs({
    **{name: _cfg(paper_ids='arXiv:1512.03385', paper_name='Deep Residual Learning for Image Recognition')
       for name in _RESNET_DEPTHS},
    **{name: _cfg(paper_ids='arXiv:1605.07146', paper_name='Wide Residual Networks') for name in _WRN_ARGS},
})


def _resnet(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    return _create(CifarResNet, variant, pretrained, **dict(dict(depth=_RESNET_DEPTHS[variant]), **kwargs))


def _wrn(variant: str, pretrained: bool, **kwargs) -> WideResNet:
    depth, k = _WRN_ARGS[variant]
    return _create(WideResNet, variant, pretrained, **dict(dict(depth=depth, widen_factor=k), **kwargs))


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-8 (n=1)."""
    return _resnet('cifar_resnet8', pretrained, **kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-14 (n=2)."""
    return _resnet('cifar_resnet14', pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (n=3)."""
    return _resnet('cifar_resnet20', pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (n=5)."""
    return _resnet('cifar_resnet32', pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (n=7)."""
    return _resnet('cifar_resnet44', pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (n=9)."""
    return _resnet('cifar_resnet56', pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110 (n=18)."""
    return _resnet('cifar_resnet110', pretrained, **kwargs)


@register_model
def cifar_wrn16_1(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-1 (n=2, widths 16/32/64)."""
    return _wrn('cifar_wrn16_1', pretrained, **kwargs)


@register_model
def cifar_wrn16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-2 (n=2, widths 32/64/128)."""
    return _wrn('cifar_wrn16_2', pretrained, **kwargs)


@register_model
def cifar_wrn16_4(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-4 (n=2, widths 64/128/256)."""
    return _wrn('cifar_wrn16_4', pretrained, **kwargs)


@register_model
def cifar_wrn28_4(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-4 (n=4, widths 64/128/256)."""
    return _wrn('cifar_wrn28_4', pretrained, **kwargs)


@register_model
def cifar_wrn40_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-2 (n=6, widths 32/64/128)."""
    return _wrn('cifar_wrn40_2', pretrained, **kwargs)
