"""Memory format and precision on the CPU: channels_last where asked, bfloat16 only when asked and native."""

from __future__ import annotations

import pytest
import torch

from medtransfer import device as dev


def test_channels_last_applies_on_the_cpu_and_changes_outputs_only_by_rounding() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 32, 32)
    ref = conv(x)
    net = dev.prepare_model(conv, torch.device("cpu"), channels_last=True)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    xb = dev.to_device(x, torch.device("cpu"), channels_last=True)
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(net(xb), ref, atol=1e-5)
    assert dev.to_device(torch.randn(2, 3, 4, 4, 4), torch.device("cpu"), channels_last=True).is_contiguous()


def test_cpu_bf16_is_opt_in_and_needs_native_support(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert dev.amp_dtype(cpu, True) is None  # train.amp alone never changes CPU numerics
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert dev.amp_dtype(cpu, True, cpu_bf16=True) == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.amp_dtype(cpu, True, cpu_bf16=True) is None
