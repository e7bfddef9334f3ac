"""Devices, memory format and mixed precision: CUDA with AMP when present, else the CPU.

- **channels_last** (``train.channels_last``, on by default) on CUDA and on the CPU: oneDNN's convolutions
  are faster in NHWC. Measured on 2 CPU cores with EfficientNet-Lite0 (benchmarks/inference.py, train.py):
  inference 1.1-1.3x and training 1.6-1.7x at 64-224 px; outputs agree with NCHW to ~1e-5.
- **AMP on CUDA** (``train.amp``): bfloat16 where the GPU supports it (no loss scaling needed), else float16
  with a GradScaler.
- **bfloat16 on the CPU** (``train.cpu_bf16``, off by default): autocast for inference passes on CPUs with
  native bfloat16 instructions (AVX512-BF16, AMX). Measured 3.5x faster inference at 224 px on such a CPU,
  but probabilities moved by up to 0.11 (mean 0.007) on 90 real chest X-rays against float32, so it is an
  opt-in for bulk prediction, not the default for the numbers a report states. Training on the CPU always
  runs in float32, so the trained weights do not depend on which CPU trained them.

The first call of :func:`resolve_device` also sizes torch's thread pool to the CPUs this process may use
(:mod:`medtransfer.cpu`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from medtransfer.cpu import configure_torch
from medtransfer.errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available (this process's local rank under torchrun), else CPU.

    Also sizes torch's CPU thread pool once per process (see :func:`medtransfer.cpu.configure_torch`).
    """
    configure_torch()
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


def amp_dtype(device: torch.device, enabled: bool, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``device`` (None = full precision).

    CUDA: bfloat16 or float16 when ``enabled``. CPU: bfloat16 only when ``cpu_bf16`` is asked for and the CPU
    has native bfloat16 instructions (else float32, with a log line saying why).
    """
    if device.type == "cpu":
        if not cpu_bf16:
            return None
        if cpu_has_native_bf16():
            return torch.bfloat16
        logger.info("train.cpu_bf16 is set but this CPU has no native bfloat16 instructions (AVX512-BF16/AMX), "
                    "where bfloat16 is slower than float32: using float32")
        return None
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN can run bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast (CUDA, or bfloat16 on the CPU) when ``dtype`` is set; a no-op otherwise."""
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
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool) -> torch.nn.Module:
    """Move the model to ``device``, in channels_last memory format when asked (faster convolutions on CUDA and CPU).

    A network with 3D convolutions (5D weights: ``model.volume: native``) keeps its default memory format:
    channels_last applies to 4D tensors only, and channels_last_3d was not measured to help here. 2.5D and ACS
    volume models hold 2D kernels (4D weights) and are converted like image models.
    """
    model = model.to(device)
    if channels_last and not any(p.dim() == 5 for p in model.parameters()):
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
