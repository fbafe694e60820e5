"""Any timm model that gives feature maps is a peer: a matrix over families in their tiniest variants (CPU,
64 px): the feature map's shape, one AFD iteration moves exactly each stage's parameters, the l1/l2
baselines run, and the Swin regression (its (B, H, W, C) output was once read as (B, C, H, W))."""

import pytest
import torch

from fastafd.errors import UserError
from fastafd.models.peers import build_kwargs, create_peer, feature_parameters, feature_shape, features, head_parameters
from tests.helpers import batches, changed, iterate, snapshot, tiny_config, tiny_task

SIZE = 64
FAMILIES = {
    # family: (tiniest variant, feature map (C, H, W) at 64 px)
    "resnet": ("resnet10t", (512, 2, 2)),
    "vit": ("vit_tiny_patch16_224", (192, 4, 4)),  # 4x4 patch tokens: built for 64 px
    "deit": ("deit_tiny_patch16_224", (192, 4, 4)),
    "swin": ("swin_tiny_patch4_window7_224", (768, 2, 2)),
    "convnext": ("convnext_atto", (320, 2, 2)),
    "efficientnet": ("efficientnet_b0", (320, 2, 2)),  # the last stage, not the 1280-channel head convolution
    "regnet": ("regnetx_002", (368, 2, 2)),
    "mobilenetv3": ("mobilenetv3_small_050", (288, 2, 2)),
    "levit": ("levit_128s", (384, 1, 1)),
    "cifar": ("cifar_resnet8", (64, 16, 16)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_feature_map_of_each_family_is_nchw_of_the_last_stage(family):
    name, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = create_peer(name, 10, image_size=SIZE)
    assert feature_shape(model, SIZE, name) == shape
    x = torch.randn(2, 3, SIZE, SIZE)
    assert features(model.train(), x).shape == (2, *shape)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "cifar"])
def test_one_afd_iteration_with_a_cnn_moves_exactly_each_stages_parameters(family):
    name, _ = FAMILIES[family]
    task, stages = tiny_task(tiny_config(("resnet10t", name) if family != "resnet" else ("cifar_resnet8", name), image_size=SIZE, batch=4))
    before = snapshot(task)
    iterate(task, stages, batches(1, batch=4, size=SIZE))
    moved = changed(before, task)
    named = dict(task.named_parameters())
    for stage_name, stage in stages.items():
        ids = {id(p) for p in stage.params}
        owned = {k for k, p in named.items() if id(p) in ids}
        assert owned & moved, f"{family}: stage {stage_name} moved nothing"
    everything = {k for k, p in named.items() if any(id(p) in {id(q) for q in s.params} for s in stages.values())}
    assert moved <= everything  # nothing outside the stages moves
    assert all(torch.isfinite(p).all() for p in task.parameters())


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_alignment_baselines_across_a_cnn_vit_pair(method):
    task, stages = tiny_task(tiny_config(("resnet10t", "deit_tiny_patch16_224"), method=method, image_size=SIZE, batch=4))
    metrics = iterate(task, stages, batches(1, batch=4, size=SIZE))
    assert metrics["align"].shape == (2,) and torch.isfinite(metrics["align"]).all()
    assert task.shapes == [(512, 2, 2), (192, 4, 4)]


def test_swin_map_is_channels_first():
    """Swin's forward_features is (B, H, W, C) = (B, 2, 2, 768) at 64 px; the peer map is (B, 768, 2, 2)."""
    model = create_peer("swin_tiny_patch4_window7_224", 10, image_size=SIZE)
    x = torch.randn(1, 3, SIZE, SIZE)
    assert tuple(model.forward_features(x).shape) == (1, 2, 2, 768)
    assert feature_shape(model, SIZE) == (768, 2, 2)


def test_transformers_are_built_for_the_run_resolution_and_cnns_need_nothing():
    assert build_kwargs("vit_tiny_patch16_224", 96) == {"img_size": 96}
    assert build_kwargs("resnet18", 96) == {} and build_kwargs("cifar_resnet8", 32) == {}
    model = create_peer("vit_tiny_patch16_224", 10, image_size=96)
    assert feature_shape(model, 96) == (192, 6, 6)


def test_a_model_that_cannot_run_at_the_size_is_one_line():
    model = create_peer("vit_tiny_patch16_224", 10, image_size=64)
    with pytest.raises(UserError, match="cannot run at 96 px"):
        feature_shape(model, 96, "vit_tiny_patch16_224")


def test_feature_parameters_exclude_the_classifier_of_a_vit():
    model = create_peer("deit_tiny_patch16_224", 10, image_size=SIZE)
    head = head_parameters(model)
    params = feature_parameters(model)
    assert head and not head & {id(p) for p in params} and len(params) + len(head) == len(list(model.parameters()))
