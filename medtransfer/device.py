"""Devices and mixed precision: CPU by default here, CUDA with AMP and channels_last when present.

AMP uses bfloat16 where the GPU supports it (no loss scaling needed) and float16 with a GradScaler
otherwise; on CPU, AMP is off (CPU autocast rarely speeds up convolutions and changes numerics).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from medtransfer.errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available (this process's local rank under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device '{name}' is not a valid torch device; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was requested but CUDA is not available; use --device cpu")
    return dev


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for ``device`` (None = full precision)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast on CUDA when ``dtype`` is set; a no-op otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for float16 on CUDA."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def to_device(x: torch.Tensor, device: torch.device, *, channels_last: bool = False) -> torch.Tensor:
    """Move a batch tensor (non-blocking from pinned memory); 4D image batches optionally channels_last."""
    x = x.to(device, non_blocking=device.type == "cuda")
    if channels_last and x.dim() == 4 and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool) -> torch.nn.Module:
    """Move the model to ``device`` (channels_last on CUDA, where it speeds up convolutions with AMP)."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels (warn-only where none exists)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def describe(device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """What ran where, for the model card."""
    info: dict[str, Any] = {"device": str(device), "amp": str(dtype).replace("torch.", "") if dtype else "off"}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
