"""Saliency overlays as PNG: the scan in grey, the heat map blended over it, a colour bar, a title.

The scan is the cached [0, 1] image (``ScanDataset.cached_image``): already windowed and, for MONOCHROME1,
inverted to bone-bright, so it is shown as is with ``vmin=0, vmax=1`` (no re-windowing, no per-image
contrast stretch that would hide what the model saw). Matplotlib's object API with the Agg canvas is
used (no pyplot state, safe in threads and without a display).

Privacy: the title carries only what the caller passes (case_id, class, method, scores; never names or
paths), and the PNG's text chunks are set explicitly to ``{"Software": "medtransfer"}``; matplotlib
would otherwise write its own version string, and nothing else is added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medtransfer import io

PNG_METADATA = {"Software": "medtransfer"}


def save_overlay(
    path: str | Path,
    image: np.ndarray | torch.Tensor,
    saliency: np.ndarray | torch.Tensor,
    *,
    title: str = "",
    alpha: float = 0.45,
    cmap: str = "jet",
    contour: float | None = 0.5,
    dpi: int = 100,
    size_inches: float = 4.0,
) -> Path:
    """Write one overlay PNG atomically and return its path.

    Args:
        path: the PNG to write (parent folders are created).
        image: the scan, float (H, W) or (1, H, W) in [0, 1], display polarity (bone bright).
        saliency: the map, float (H, W) or (1, H, W) in [0, 1] (``SaliencyMaps.maps[i, k]``).
        title: one line above the image, e.g. ``"case 3f2a… · pneumonia · gradcam · p=0.91"``; must not
            carry PHI (callers pass the pseudonymous case_id).
        alpha: opacity of the heat map at full saliency (it fades to transparent at 0, so the anatomy
            stays visible where the model does not look).
        cmap: matplotlib colour map for the heat map.
        contour: draw the iso-line of the map at this level (None: no contour).
        dpi, size_inches: output resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    img = _plane(image)
    sal = np.nan_to_num(np.clip(_plane(saliency), 0, 1))
    if img.shape != sal.shape:
        raise ValueError(f"image {img.shape} and saliency {sal.shape} must have the same size")
    fig = Figure(figsize=(size_inches * 1.2, size_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    heat = ax.imshow(sal, cmap=cmap, norm=Normalize(0.0, 1.0), alpha=alpha * sal, interpolation="bilinear")
    if contour is not None and sal.max() > contour > sal.min():
        ax.contour(sal, levels=[contour], colors="white", linewidths=0.8)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.colorbar(ScalarMappable(norm=heat.norm, cmap=heat.cmap), ax=ax, fraction=0.046, pad=0.04, label="saliency (scaled per image)")
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata=dict(PNG_METADATA), bbox_inches="tight")
    return Path(path)


def _plane(x: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2D image or (1, H, W), got shape {np.shape(x)}")
    return arr
