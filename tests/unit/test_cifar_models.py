"""Unit tests for the CIFAR networks registered with timm by ``fastafd.models.cifar``."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._manipulate import group_parameters

import fastafd.models.cifar as cifar

RESNETS = ['cifar_resnet8', 'cifar_resnet14', 'cifar_resnet20', 'cifar_resnet32',
           'cifar_resnet44', 'cifar_resnet56', 'cifar_resnet110']
WRNS = ['cifar_wrn16_1', 'cifar_wrn16_2', 'cifar_wrn16_4', 'cifar_wrn28_4', 'cifar_wrn40_2']
ALL = RESNETS + WRNS

# Exact parameter counts with num_classes=100 (computed from the architecture definition).
PARAMS_100 = {
    'cifar_resnet8': 83_892,
    'cifar_resnet14': 181_108,
    'cifar_resnet20': 278_324,
    'cifar_resnet32': 472_756,
    'cifar_resnet44': 667_188,
    'cifar_resnet56': 861_620,
    'cifar_resnet110': 1_736_564,
    'cifar_wrn16_1': 180_916,
    'cifar_wrn16_2': 703_284,
    'cifar_wrn16_4': 2_772_020,
    'cifar_wrn28_4': 5_872_180,
    'cifar_wrn40_2': 2_255_156,
}
# Published sizes (CIFAR-100 heads) as reported in the KD literature (AFD / CRD tables).
PUBLISHED_100 = {
    'cifar_resnet32': 0.47e6,
    'cifar_resnet110': 1.73e6,
    'cifar_wrn16_2': 0.70e6,
    'cifar_wrn16_4': 2.77e6,
    'cifar_wrn28_4': 5.87e6,
}
FEATURE_CHS = {**{n: 64 for n in RESNETS}, 'cifar_wrn16_1': 64, 'cifar_wrn16_2': 128, 'cifar_wrn16_4': 256,
               'cifar_wrn28_4': 256, 'cifar_wrn40_2': 128}
# one small model of each family for the per-behaviour tests
SMALL = ['cifar_resnet8', 'cifar_wrn16_2']


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # tiny CPU workloads: one intra-op thread is faster and robust to a busy machine
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch(n: int = 2, chans: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, chans, 32, 32, generator=g)


def _perturb_bn_stats(model: torch.nn.Module) -> None:
    """A few train-mode forwards so the running BN statistics are no longer the init values."""
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(_batch(8, model.in_chans, seed=100 + s) * 2 + 0.5)
    model.eval()


def test_registry_lists_exactly_the_cifar_models():
    assert sorted(timm.list_models('cifar_*')) == sorted(ALL)
    for name in ALL:
        assert timm.is_model(name)
        assert not timm.is_model_pretrained(name), 'no published weights: the cfg must have no url'


@pytest.mark.parametrize('name', ALL)
def test_builds_and_param_count(name):
    model = timm.create_model(name, num_classes=100)
    expected_cls = cifar.CifarResNet if name in RESNETS else cifar.WideResNet
    assert type(model) is expected_cls
    assert model.num_classes == 100
    assert model.fc.out_features == 100
    assert _n_params(model) == PARAMS_100[name]
    if name in PUBLISHED_100:
        assert abs(_n_params(model) - PUBLISHED_100[name]) / PUBLISHED_100[name] < 0.03


def test_depths_and_widths():
    # depth 6n+2 / 6n+4: count the blocks and the stage widths
    for name in RESNETS:
        m = timm.create_model(name)
        n = (m.depth - 2) // 6
        assert [len(getattr(m, f'layer{i}')) for i in (1, 2, 3)] == [n] * 3
        assert name == f'cifar_resnet{6 * n + 2}'
        assert [getattr(m, f'layer{i}')[-1].conv2.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    for name in WRNS:
        m = timm.create_model(name)
        n = (m.depth - 4) // 6
        k = m.widen_factor
        assert name == f'cifar_wrn{m.depth}_{k}'
        assert [len(getattr(m, f'layer{i}')) for i in (1, 2, 3)] == [n] * 3
        assert [getattr(m, f'layer{i}')[-1].conv2.out_channels for i in (1, 2, 3)] == [16 * k, 32 * k, 64 * k]


def test_shortcuts():
    r = timm.create_model('cifar_resnet20')
    for i, stage in enumerate((r.layer1, r.layer2, r.layer3)):
        for j, block in enumerate(stage):
            if i > 0 and j == 0:
                conv, bn = block.downsample
                assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
                assert isinstance(bn, torch.nn.BatchNorm2d)
            else:
                assert block.downsample is None
    w = timm.create_model('cifar_wrn16_1')  # k=1: first stage keeps 16 channels, identity shortcut
    assert w.layer1[0].shortcut is None
    assert w.layer2[0].shortcut.kernel_size == (1, 1) and w.layer2[0].shortcut.stride == (2, 2)
    w2 = timm.create_model('cifar_wrn16_2')  # k=2: 16 -> 32 channels at stride 1 needs a projection
    assert w2.layer1[0].shortcut.stride == (1, 1) and w2.layer1[0].shortcut.out_channels == 32
    assert w2.layer1[1].shortcut is None


def test_default_cfg():
    for name in SMALL:
        m = timm.create_model(name)
        cfg = m.pretrained_cfg
        assert cfg['architecture'] == name
        assert tuple(cfg['input_size']) == (3, 32, 32)
        assert tuple(cfg['pool_size']) == (8, 8)
        assert tuple(cfg['mean']) == (0.5071, 0.4865, 0.4409)
        assert tuple(cfg['std']) == (0.2673, 0.2564, 0.2762)
        assert cfg['num_classes'] == 100 and m.num_classes == 100
        assert cfg['first_conv'] == 'conv1' and isinstance(m.get_submodule('conv1'), torch.nn.Conv2d)
        assert cfg['classifier'] == 'fc' and m.get_classifier() is m.fc
        assert not cfg.get('url')
        data_cfg = timm.data.resolve_data_config({}, model=m)
        assert data_cfg['input_size'] == (3, 32, 32) and data_cfg['mean'] == (0.5071, 0.4865, 0.4409)


@pytest.mark.parametrize('name', ALL)
def test_forward_features_shape(name):
    model = timm.create_model(name, num_classes=100).eval()
    with torch.no_grad():
        feats = model.forward_features(_batch())
    c = FEATURE_CHS[name]
    assert feats.shape == (2, c, 8, 8)
    assert model.num_features == c
    assert model.feature_info[-1]['num_chs'] == c


@pytest.mark.parametrize('name', SMALL)
def test_forward_is_head_of_features(name):
    model = timm.create_model(name, num_classes=100, drop_rate=0.2)
    _perturb_bn_stats(model)
    x = _batch(3)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert torch.equal(logits, model.forward_head(feats))
        pooled = model.forward_head(feats, pre_logits=True)
    assert logits.shape == (3, 100)
    assert pooled.shape == (3, model.num_features)
    torch.testing.assert_close(pooled, feats.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model.fc(pooled))
    # the feature map is post-ReLU (for the WRN: after the final BN + ReLU)
    assert feats.min() >= 0


def test_wrn_features_are_after_final_bn_relu():
    m = timm.create_model('cifar_wrn16_2')
    _perturb_bn_stats(m)
    x = _batch()
    with torch.no_grad():
        pre = m.layer3(m.layer2(m.layer1(m.conv1(x))))
        expected = torch.relu(m.norm(pre))
        assert torch.equal(m.forward_features(x), expected)
    assert (pre < 0).any(), 'stage output is pre-activation, so it must differ from the feature map'


@pytest.mark.parametrize('name', SMALL)
def test_feature_info_and_features_only(name):
    model = timm.create_model(name)
    assert [f['reduction'] for f in model.feature_info] == [1, 2, 4]
    c = model.num_features
    assert [f['num_chs'] for f in model.feature_info] == [c // 4, c // 2, c]
    for f in model.feature_info:
        model.get_submodule(f['module'])  # raises if the module does not exist

    fnet = timm.create_model(name, features_only=True)
    assert fnet.feature_info.reduction() == [1, 2, 4]
    outs = fnet(_batch())
    assert [tuple(o.shape) for o in outs] == [(2, c // 4, 32, 32), (2, c // 2, 16, 16), (2, c, 8, 8)]
    # the last feature equals forward_features of the same weights
    model.load_state_dict(fnet.state_dict(), strict=False)
    model.eval()
    fnet.eval()
    with torch.no_grad():
        assert torch.equal(fnet(_batch())[-1], model.forward_features(_batch()))


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('num_classes', [100, 10])
def test_pretrained_file_round_trip(tmp_path, name, num_classes):
    src = timm.create_model(name, num_classes=num_classes)
    _perturb_bn_stats(src)  # buffers must round-trip too
    path = tmp_path / 'weights.safetensors'
    save_file(src.state_dict(), str(path))

    loaded = timm.create_model(
        name, num_classes=num_classes, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    fresh = timm.create_model(name, num_classes=num_classes).eval()
    x = _batch(4)
    with torch.no_grad():
        ref = src(x)
        assert torch.equal(loaded(x), ref)
        assert not torch.allclose(fresh(x), ref), 'a fresh model must differ, else the test proves nothing'
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_pretrained_file_transfer_drops_head(tmp_path):
    # naming the checkpoint's own num_classes in the overlay -> timm's transfer path: backbone kept, new head
    src = timm.create_model('cifar_resnet8', num_classes=100)
    _perturb_bn_stats(src)
    path = tmp_path / 'c100.safetensors'
    save_file(src.state_dict(), str(path))
    dst = timm.create_model(
        'cifar_resnet8', num_classes=10, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=100),
    ).eval()
    assert dst.fc.out_features == 10
    x = _batch()
    with torch.no_grad():
        assert torch.equal(dst.forward_features(x), src.forward_features(x))
    # without naming it, a mismatched head is an error, not a silent re-init
    with pytest.raises(RuntimeError, match='size mismatch'):
        timm.create_model('cifar_resnet8', num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_without_file_raises():
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('cifar_resnet8', pretrained=True)


@pytest.mark.parametrize('name', SMALL + ['cifar_wrn16_1'])
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=10).train()
    x = _batch(4)
    y = torch.tensor([0, 3, 5, 9])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize('name', SMALL)
def test_grad_checkpointing_matches(name, monkeypatch):
    calls = []
    real = cifar.checkpoint_seq

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cifar, 'checkpoint_seq', spy)
    torch.manual_seed(0)
    a = timm.create_model(name, num_classes=10).train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    assert b.grad_checkpointing and not a.grad_checkpointing
    x = _batch(4)
    ya, yb = a(x), b(x)
    assert calls, 'checkpointing path not taken'
    torch.testing.assert_close(ya, yb)
    ya.square().mean().backward()
    yb.square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_init():
    for name in SMALL:
        m = timm.create_model(name)
        for mod_name, mod in m.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                assert torch.equal(mod.weight, torch.ones_like(mod.weight)), mod_name
                assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), mod_name
            if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3) and mod.out_channels >= 64:
                # kaiming normal, fan_out, relu: std = sqrt(2 / (out * k * k))
                std = (2.0 / (mod.out_channels * 9)) ** 0.5
                assert abs(mod.weight.std().item() - std) / std < 0.1, mod_name
        assert torch.equal(m.fc.bias, torch.zeros_like(m.fc.bias))


@pytest.mark.parametrize('name', SMALL)
def test_classifier_reset_and_kwargs(name):
    m = timm.create_model(name, num_classes=100)
    m.reset_classifier(7)
    assert m.num_classes == 7 and m.get_classifier().out_features == 7
    assert m(_batch()).shape == (2, 7)
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), torch.nn.Identity)
    assert m(_batch()).shape == (2, m.num_features)
    m.reset_classifier(5, global_pool='max')
    m.eval()
    with torch.no_grad():
        feats = m.forward_features(_batch())
        torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.amax(dim=(2, 3)))

    headless = timm.create_model(name, num_classes=0)
    assert headless(_batch()).shape == (2, headless.num_features)
    unpooled = timm.create_model(name, num_classes=0, global_pool='')
    assert unpooled(_batch()).shape == (2, unpooled.num_features, 8, 8)

    gray = timm.create_model(name, in_chans=1, num_classes=3)
    assert gray.in_chans == 1 and gray.conv1.in_channels == 1
    assert gray(_batch(chans=1)).shape == (2, 3)

    d = timm.create_model(name, drop_rate=0.5).train()
    assert d.drop_rate == 0.5
    with torch.no_grad():
        feats = d.forward_features(_batch())
        assert not torch.equal(d.forward_head(feats), d.forward_head(feats)), 'head dropout must be active'
        d.eval()
        assert torch.equal(d.forward_head(feats), d.forward_head(feats))

    with pytest.raises(TypeError):
        timm.create_model(name, no_such_kwarg=1)


def test_wrn_block_dropout():
    m = timm.create_model('cifar_wrn16_2', block_drop_rate=0.3)
    assert m.block_drop_rate == 0.3 and m.drop_rate == 0
    drops = [mod for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)  # one per block, 2 blocks x 3 stages
    m.train()
    with torch.no_grad():
        assert not torch.equal(m.forward_features(_batch()), m.forward_features(_batch()))
    plain = timm.create_model('cifar_wrn16_2')
    assert not any(isinstance(mod, torch.nn.Dropout) for mod in plain.modules())


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('coarse', [False, True])
def test_group_matcher(name, coarse):
    m = timm.create_model(name)
    groups = group_parameters(m, m.group_matcher(coarse=coarse))
    named = dict(m.named_parameters())
    flat = [n for g in sorted(groups) for n in groups[g]]
    assert sorted(flat) == sorted(named), 'every parameter in exactly one group'
    first, last = groups[min(groups)], groups[max(groups)]
    assert all(n.startswith(('conv1.', 'bn1.')) for n in first) and 'conv1.weight' in first
    assert 'fc.weight' in last
    n_blocks = sum(len(getattr(m, f'layer{i}')) for i in (1, 2, 3))
    n_block_groups = 3 if coarse else n_blocks
    # stem + blocks + head; the WRN's final norm joins the last block group (timm's MATCH_PREV_GROUP)
    assert len(groups) == 1 + n_block_groups + 1
    if name in WRNS:
        assert 'norm.weight' in groups[max(groups) - 1] and 'layer3.1.conv2.weight' in groups[max(groups) - 1]
    layer_order = [g for g in sorted(groups) if groups[g][0].startswith('layer')]
    assert [groups[g][0].split('.')[0] for g in layer_order][:1] == ['layer1']
    assert groups[layer_order[-1]][0].startswith('layer3')


def test_invalid_depth():
    with pytest.raises(ValueError):
        cifar.CifarResNet(depth=33)
    with pytest.raises(ValueError):
        cifar.WideResNet(depth=17)


def test_block_equations():
    """Pin the block computations (shortcut placement, pre- vs post-activation) against hand-written ops."""
    relu = torch.relu
    r = timm.create_model('cifar_resnet8')
    w = timm.create_model('cifar_wrn16_2')
    _perturb_bn_stats(r)
    _perturb_bn_stats(w)
    x16 = _batch(2, 16)
    with torch.no_grad():
        b = r.layer2[0]  # ResNet block with projection: relu(bn2(conv2(relu(bn1(conv1 x)))) + bn(conv1x1 x))
        conv, bn = b.downsample
        expected = relu(b.bn2(b.conv2(relu(b.bn1(b.conv1(x16))))) + bn(conv(x16)))
        assert torch.equal(b(x16), expected)
        b = w.layer1[0]  # WRN block with projection from the pre-activated input
        pre = relu(b.bn1(x16))
        expected = b.conv2(relu(b.bn2(b.conv1(pre)))) + b.shortcut(pre)
        assert torch.equal(b(x16), expected)
        x32 = _batch(2, 32)
        b = w.layer1[1]  # WRN identity block: the raw input is added
        expected = b.conv2(relu(b.bn2(b.conv1(relu(b.bn1(x32)))))) + x32
        assert torch.equal(b(x32), expected)
