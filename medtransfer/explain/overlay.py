"""Saliency overlays as PNG: the scan in grey, the heat map blended over it, a colour bar, a title.

The scan is the cached [0, 1] image (``ScanDataset.cached_image``): already windowed and, for MONOCHROME1,
inverted to bone-bright, so it is shown as is with ``vmin=0, vmax=1`` (no re-windowing, no per-image
contrast stretch that would hide what the model saw). Matplotlib's object API with the Agg canvas is
used (no pyplot state, safe in threads and without a display).

Volumes (maps (D, H, W)) get one PNG montage: the axial, coronal and sagittal slices through the saliency
peak (the voxel with the largest map value), each drawn as a 2D overlay (same grey image, colour map, opacity
and contour), the peak marked with a small cross, and for ``slices`` models a fourth pane below with the
attention weight of every axial slice and the shown slice marked. Arrays follow medtransfer's (D, H, W)
layout (for orientation RAS: slices inferior to superior, rows anterior to posterior, columns from the
patient's right to left): the axial pane is shown as stored (radiological view), the coronal and sagittal
panes with superior at the top, the sagittal one with anterior on the left. Voxels are drawn square (the
model's input grid). For another ``orientation`` the panes are named by array axis, not by anatomy.

Privacy: the title carries only what the caller passes (case_id, class, method, scores; never names or
paths), and the PNG's text chunks are set explicitly to ``{"Software": "medtransfer"}``; matplotlib
would otherwise write its own version string, and nothing else is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    attention: np.ndarray | torch.Tensor | None = None,
    orientation: str = "RAS",
) -> Path:
    """Write one overlay PNG atomically (a 3-pane montage for a volume) and return its path.

    Args:
        path: the PNG to write (parent folders are created).
        image: the scan in [0, 1], display polarity (bone bright): (H, W) or (k, H, W) for an image, (D, H, W)
            or (k, D, H, W) for a volume; with k channels (CT windows) the first is shown.
        saliency: the map in [0, 1] (``SaliencyMaps.maps[i, k]``): (H, W) or (1, H, W); (D, H, W) or
            (1, D, H, W) for a volume (a montage, see the module docstring).
        title: one line above the image, e.g. ``"case 3f2a… · pneumonia · gradcam · p=0.91"``; must not
            carry PHI (callers pass the pseudonymous case_id).
        alpha: opacity of the heat map at full saliency (it fades to transparent at 0, so the anatomy
            stays visible where the model does not look).
        cmap: matplotlib colour map for the heat map.
        contour: draw the iso-line of the map at this level (None: no contour).
        dpi, size_inches: output resolution (height of one pane).
        attention: volumes from ``slices`` models: attention weight per axial slice (S,)
            (``SaliencyMaps.attention[i]``), drawn as a curve below the montage; None: no curve.
        orientation: the volume's axcode (``card.input.orientation``); panes are named axial/coronal/sagittal
            for RAS only.

    Examples:
        >>> save_overlay("c1.png", ds.cached_image(0), sm.maps[0, 0], title="c1 · nodule")  # doctest: +SKIP
    """
    sal = np.nan_to_num(np.clip(_squeezed(saliency), 0, 1))
    if sal.ndim not in (2, 3):
        raise ValueError(f"expected a 2D map (H, W) or a volume map (D, H, W), got shape {np.shape(saliency)}")
    img = _first_channel(image, sal.ndim)
    if img.shape != sal.shape:
        raise ValueError(f"image {img.shape} and saliency {sal.shape} must have the same size")
    if sal.ndim == 3:
        fig = _montage(img, sal, title=title, alpha=alpha, cmap=cmap, contour=contour, dpi=dpi,
                       size_inches=size_inches, attention=attention, orientation=orientation)
    else:
        fig = _single(img, sal, title=title, alpha=alpha, cmap=cmap, contour=contour, dpi=dpi,
                      size_inches=size_inches)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata=dict(PNG_METADATA), bbox_inches="tight")
    return Path(path)


def _single(img: np.ndarray, sal: np.ndarray, *, title: str, alpha: float, cmap: str, contour: float | None,
            dpi: int, size_inches: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size_inches * 1.2, size_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    heat = _pane(ax, img, sal, alpha=alpha, cmap=cmap, contour=contour)
    if title:
        ax.set_title(title, fontsize=8)
    _colorbar(fig, heat, ax)
    return fig


def _montage(img: np.ndarray, sal: np.ndarray, *, title: str, alpha: float, cmap: str, contour: float | None,
             dpi: int, size_inches: float, attention: np.ndarray | torch.Tensor | None, orientation: str) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d, h, w = sal.shape
    peak = np.unravel_index(int(np.argmax(sal)), sal.shape) if sal.max() > 0 else (d // 2, h // 2, w // 2)
    z, y, x = (int(v) for v in peak)
    ras = str(orientation).upper() == "RAS"
    names = ("axial", "coronal", "sagittal") if ras else ("axis-0 slice", "axis-1 plane", "axis-2 plane")
    # (name, image plane, map plane, peak (row, col) in the plane, position text); superior at the top
    panes = [(names[0], img[z], sal[z], (y, x), f"slice {z + 1}/{d}"),
             (names[1], img[::-1, y, :], sal[::-1, y, :], (d - 1 - z, x), f"row {y + 1}/{h}"),
             (names[2], img[::-1, :, x], sal[::-1, :, x], (d - 1 - z, y), f"column {x + 1}/{w}")]
    att = None if attention is None else np.asarray(_squeezed(attention), dtype=np.float64).reshape(-1)
    fig = Figure(figsize=(size_inches * 3.4, size_inches * (1.45 if att is not None else 1.0)), dpi=dpi,
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if att is not None else 1, 3, height_ratios=[1, 0.4] if att is not None else [1])
    axes = []
    for j, (name, im, sm, (r, c), where) in enumerate(panes):
        ax = fig.add_subplot(grid[0, j], label=name)
        heat = _pane(ax, im, sm, alpha=alpha, cmap=cmap, contour=contour)
        ax.plot([c], [r], marker="+", color="white", markersize=7, markeredgewidth=1.0)
        ax.set_title(f"{name} · {where}", fontsize=8)
        axes.append(ax)
    _colorbar(fig, heat, axes)
    if title:
        fig.suptitle(title, fontsize=8)
    if att is not None:
        _attention_pane(fig.add_subplot(grid[1, :], label="attention"), att, z, d, ras)
    return fig


def _attention_pane(ax: Any, att: np.ndarray, z: int, depth: int, ras: bool) -> None:
    """Attention weight per slice, the shown axial slice marked (S slices; mapped from D when S != D)."""
    from matplotlib.ticker import MaxNLocator

    s = np.arange(1, len(att) + 1)
    shown = z + 1 if len(att) == depth else 1 + round(z * (len(att) - 1) / max(1, depth - 1))
    ax.plot(s, att, color="black", linewidth=1.0, marker="o", markersize=2)
    ax.axvline(shown, color="tab:red", linewidth=1.0, linestyle="--", label=f"shown slice {shown}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, len(att) + 0.5)
    ax.set_ylim(0, max(float(np.nanmax(att)) if np.isfinite(att).any() else 0.0, 1e-6) * 1.1)
    ax.set_xlabel("axial slice (inferior to superior)" if ras else "slice (axis 0)", fontsize=8)
    ax.set_ylabel("attention", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right", frameon=False)


def _pane(ax: Any, img: np.ndarray, sal: np.ndarray, *, alpha: float, cmap: str, contour: float | None) -> Any:
    """The scan in grey, the map blended over it (opacity follows the map), its contour; returns the heat image."""
    from matplotlib.colors import Normalize

    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    heat = ax.imshow(sal, cmap=cmap, norm=Normalize(0.0, 1.0), alpha=alpha * sal, interpolation="bilinear")
    if contour is not None and sal.max() > contour > sal.min():
        ax.contour(sal, levels=[contour], colors="white", linewidths=0.8)
    ax.set_axis_off()
    return heat


def _colorbar(fig: Any, heat: Any, ax: Any) -> None:
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=heat.norm, cmap=heat.cmap), ax=ax, fraction=0.046, pad=0.04,
                 label="saliency (scaled per image)")


def _as_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _squeezed(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.squeeze(_as_array(x))


def _first_channel(x: np.ndarray | torch.Tensor, dims: int) -> np.ndarray:
    """The image as ``dims`` axes: leading singleton or channel axes dropped (the first channel kept)."""
    arr = _as_array(x)
    if arr.ndim < dims:
        raise ValueError(f"expected a {dims}D image with optional leading channel axis, got shape {np.shape(x)}")
    return arr.reshape(-1, *arr.shape[-dims:])[0]
