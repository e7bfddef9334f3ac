"""The classifier wrapper: grey-scale first conv, freezing with BatchNorm, discriminative LRs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import get_backbone, load_backbone
from medtransfer.models.classifier import (
    adapt_input_conv,
    build_model,
    get_path,
    set_path,
    vit_tokens_to_map,
)

torch.set_num_threads(2)


@pytest.mark.parametrize("name,weights", [("resnet18", "none"), ("efficientnet_lite0", "imagenet")])
def test_grey_conv_is_the_exact_sum_of_rgb_filters_and_matches_rgb_replication(name, weights):
    spec = get_backbone(name)
    torch.manual_seed(0)
    rgb_model = load_backbone(name, weights).eval()
    conv = get_path(rgb_model, spec.first_conv)
    grey_conv = adapt_input_conv(conv, 1)
    w = conv.weight.detach()
    assert grey_conv.weight.shape == (w.shape[0], 1, *w.shape[2:])
    assert torch.equal(grey_conv.weight.detach(), w[:, 0:1] + w[:, 1:2] + w[:, 2:3])
    assert type(grey_conv) is type(conv)  # keeps e.g. TF-"same" padding
    grey_model = copy.deepcopy(rgb_model)
    set_path(grey_model, spec.first_conv, grey_conv)
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        expected = rgb_model(x.expand(-1, 3, -1, -1))
        actual = grey_model(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_build_model_logs_the_adaptation_and_grey_equals_rgb_end_to_end(caplog):
    with caplog.at_level(logging.INFO, logger="medtransfer.models.classifier"):
        grey = build_model("efficientnet_lite0", ["a", "b", "c"], task="multiclass", in_channels=1).eval()
    assert "adapted first conv _conv_stem" in caplog.text and "summing RGB filters" in caplog.text
    rgb = build_model("efficientnet_lite0", ["a", "b", "c"], task="multiclass", in_channels=3).eval()
    rgb.head.load_state_dict(grey.head.state_dict())
    x = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(grey.features(x), rgb.features(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_adapt_to_more_channels_tiles_and_rescales_rgb_filters():
    conv = nn.Conv2d(3, 4, 3)
    conv6 = adapt_input_conv(conv, 6)  # [R, G, B, R, G, B] * 3/6: same response to replicated grey
    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(conv6(x.expand(-1, 6, -1, -1)), conv(x.expand(-1, 3, -1, -1)))
    assert adapt_input_conv(conv, 5).weight.shape == (4, 5, 3, 3)
    with pytest.raises(ConfigError, match="groups"):
        adapt_input_conv(nn.Conv2d(3, 3, 3, groups=3), 1)


@pytest.fixture
def lite():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", ["a", "b"], weights="none")


def _frozen_bns(model):
    return [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]


def test_freeze_backbone_trains_only_the_head_and_keeps_frozen_bn_in_eval(lite):
    lite.freeze_backbone()
    trainable = {n for n, p in lite.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    lite.train()
    bns = _frozen_bns(lite)
    assert bns and not any(m.training for m in bns)
    assert lite.head.training
    before = {k: v.clone() for k, v in lite.state_dict().items() if "running" in k}
    lite(torch.randn(4, 1, 32, 32)).sum().backward()
    after = lite.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert lite.head[1].weight.grad is not None

    lite.unfreeze()
    assert all(p.requires_grad for p in lite.parameters())
    assert all(m.training for m in _frozen_bns(lite))  # unfrozen BN trains again (model is in train mode)


def test_unfreeze_last_stages_only(lite):
    lite.train()
    lite.unfreeze(2)
    stages = lite.stages()
    flags = [all(p.requires_grad for p in s.parameters()) for s in stages]
    assert flags == [False, False, True, True, True]
    first_bn = get_path(lite.backbone, "_bn0")
    last_bn = get_path(lite.backbone, "_bn1")
    assert not first_bn.training and last_bn.training
    lite.eval()
    assert not last_bn.training


def test_param_groups_decay_by_stage(lite):
    groups = lite.param_groups(1e-3, 0.5)
    assert [g["name"] for g in groups] == ["stage0", "stage1", "stage2", "stage3", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5**k for k in (4, 3, 2, 1, 0)])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(lite.parameters()))
    opt = torch.optim.AdamW(groups)  # usable as is
    assert len(opt.param_groups) == 5


def test_no_inplace_activations_and_densenet_cam_output_is_not_overwritten():
    torch.manual_seed(0)
    model = build_model("densenet121", ["a", "b"], weights="none").eval()
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    seen = []
    model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32))
    # torchvision's DenseNet.forward would ReLU this tensor in place; ours leaves it intact for Captum
    assert (seen[0] < 0).any()


@pytest.mark.parametrize("task,classes,outputs", [
    ("binary", ["normal", "pneumonia"], 1),
    ("multiclass", ["a", "b", "c"], 3),
    ("multilabel", ["x", "y", "z", "w"], 4),
])
def test_num_outputs_per_task(task, classes, outputs):
    model = build_model("efficientnet_lite0", classes, task=task, weights="none").eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, outputs)
    assert model.classes == tuple(classes) and model.task == task


@pytest.mark.parametrize("kwargs,match", [
    ({"classes": ["a", "b", "c"], "task": "binary"}, "exactly 2"),
    ({"classes": ["a", "b"], "task": "regression"}, "unknown task"),
    ({"classes": ["a", "a"], "task": "multiclass"}, "unique"),
    ({"classes": ["a", "b"], "task": "binary", "in_channels": 0}, "in_channels"),
])
def test_build_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model("efficientnet_lite0", weights="none", **kwargs)


def test_vit_tokens_to_map():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + 2x2 patches
    fmap = vit_tokens_to_map(tokens)
    assert fmap.shape == (2, 3, 2, 2)
    assert torch.equal(fmap[0, :, 0, 1], tokens[0, 2])  # patch 1 (row 0, col 1) is token 2
