"""Tests of medtransfer.explain; ``tiny_classifier`` is a fast Classifier for them (CAM grid = input / 2)."""

from __future__ import annotations

import torch
from torch import nn

from medtransfer.models.backbones import BackboneSpec
from medtransfer.models.classifier import Classifier


class _TinyNet(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


TINY_SPEC = BackboneSpec(
    name="tiny", builder="tests.explain:_TinyNet", weights="none", head="fc", first_conv="features.0",
    cam_layer="features.4", stages=(("features.0", "features.1"), ("features.3", "features.4")),
    feature_dim=8, input_size=32, source="tests",
)


def tiny_classifier(classes: tuple[str, ...] = ("a", "b"), *, task: str = "binary", seed: int = 0) -> Classifier:
    """A two-conv Classifier (random weights, BatchNorm statistics randomised so that eval mode matters)."""
    torch.manual_seed(seed)
    net = _TinyNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    n_out = 1 if task == "binary" else len(classes)
    return Classifier(net, TINY_SPEC, n_out, classes=classes, task=task)
