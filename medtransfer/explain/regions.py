"""Region hints: does a saliency map sit outside the body, on the image border or in a corner?

Burned-in text, side markers (L/R) and rulers live in the image border and corners, outside the patient;
a model that looks there has probably learned a shortcut (Zech et al. 2018). These are *hints* for a
reviewer, computed from simple masks, not a segmentation:

- **body mask**: Otsu threshold of the [0, 1] image (foreground = brighter than the threshold, i.e. tissue
  in a MONOCHROME2 / inverted-MONOCHROME1 radiograph), the largest connected component only (markers
  and labels are small, separate bright islands), holes filled (dark lungs inside the body). If the
  result covers < 5% of the image (blank or inverted image) the whole image counts as body, so that
  ``outside_body_mass`` is 0 rather than a false alarm.
- **border**: the outer band of width 8% of each side.
- **corners**: four squares of 15% of each side.

Masses are fractions of the map's total saliency (0 when the map is all zero).

**Volumes** (maps (N, K, D, H, W), images (N, k, D, H, W), axial slices along D): the body mask is 3D (Otsu
threshold of the whole volume, largest 3D connected component, then holes filled in every axial slice, since
lungs and bowel reach the volume's edge through the airways and are no 3D holes, and in 3D); the border band
and the corner squares are the in-plane ones of the axial slices, through every slice (columns along D):
the field-of-view edge, the table and burned-in marks sit there on every slice, whereas the first and last
slices are anatomy cut by the scan range. The first intensity channel (window) is used for the body mask.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

BORDER_FRACTION = 0.08
CORNER_FRACTION = 0.15
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
#: A corner is flagged when it holds this many times its area share of the saliency (uniform map: 1x).
#: 2.5 rather than higher because Grad-CAM is coarse (7 x 7 cells at 224 px): even a model that looks only
#: at a marker spreads its map over the whole cell around the corner square.
CORNER_ENRICHMENT_FLAG = 2.5
#: Flag a map with at least this fraction of its mass outside the body / in the border band.
OUTSIDE_BODY_FLAG = 0.5
BORDER_FLAG = 0.5


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance of the histogram)."""
    hist, edges = np.histogram(np.clip(image, 0, 1), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def body_mask(image: np.ndarray, *, volume: bool = False) -> np.ndarray:
    """Boolean body mask of a [0, 1] image (H, W) or (1, H, W), or with ``volume`` of a volume (D, H, W) or
    (k, D, H, W) (first channel); see the module docstring."""
    arr = np.asarray(image, dtype=np.float32)
    dims = 3 if volume else 2
    if arr.ndim < dims:
        raise ValueError(f"expected {'a volume (D, H, W)' if volume else 'an image (H, W)'}, got shape {arr.shape}")
    img = arr.reshape(-1, *arr.shape[-dims:])[0]  # the first channel
    fg = img > otsu_threshold(img)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.ones_like(fg)
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)
    if volume:
        mask = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    mask = ndimage.binary_fill_holes(mask)
    return mask if mask.mean() >= 0.05 else np.ones_like(fg)


def border_mask(shape: tuple[int, int], fraction: float = BORDER_FRACTION) -> np.ndarray:
    """Boolean mask (H, W) of the outer band ``fraction`` of each side wide (at least 1 pixel)."""
    h, w = shape
    bh, bw = max(1, round(h * fraction)), max(1, round(w * fraction))
    mask = np.ones((h, w), dtype=bool)
    mask[bh:h - bh, bw:w - bw] = False
    return mask


def corner_masks(shape: tuple[int, int], fraction: float = CORNER_FRACTION) -> dict[str, np.ndarray]:
    """The four corner squares (``fraction`` of each side) as boolean masks (H, W), keyed by ``CORNERS``."""
    h, w = shape
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    out = {}
    for name, (rows, cols) in zip(CORNERS, [(slice(0, ch), slice(0, cw)), (slice(0, ch), slice(w - cw, w)),
                                            (slice(h - ch, h), slice(0, cw)), (slice(h - ch, h), slice(w - cw, w))],
                                  strict=True):
        m = np.zeros((h, w), dtype=bool)
        m[rows, cols] = True
        out[name] = m
    return out


def region_hint(maps: torch.Tensor | np.ndarray, images: torch.Tensor | np.ndarray) -> pd.DataFrame:
    """Where each map's saliency mass lies.

    Args:
        maps: saliency (N, H, W), (N, 1, H, W) or (N, K, H, W) with values >= 0 (``SaliencyMaps.maps``);
            with K > 1 each target gets a row (row order: image-major). Volumes: (N, K, D, H, W) or
            (N, D, H, W).
        images: the scans as [0, 1] images (N, H, W) or (N, 1, H, W) (``ScanDataset.cached_image``, before
            normalisation), used for the body mask; volumes: (N, k, D, H, W) (always 5D: that is what says
            the maps are volumes; the first channel is used).

    Returns:
        One row per map: ``image`` (index), ``outside_body_mass``, ``border_mass``, ``corner_mass`` (of the
        richest corner), ``corner`` (its name), ``corner_enrichment`` (corner_mass / the corner's area
        share; 1 = uniform), one ``mass_<corner>`` column per corner, and ``hint``: ``;``-joined flags among
        ``corner:<name>``, ``border``, ``outside_body`` ("" when nothing stands out).
    """
    m = _as_numpy(maps)
    img = _as_numpy(images)
    volume = img.ndim == 5
    if m.ndim == (4 if volume else 3):
        m = m[:, None]
    img = img[:, 0] if img.ndim in (4, 5) else img
    dims = 3 if volume else 2
    if m.ndim != 2 + dims or len(img) != len(m) or img.shape[-dims:] != m.shape[-dims:]:
        raise ValueError(f"maps {m.shape} and images {img.shape} must have the same N and "
                         f"{'D, H, W' if volume else 'H, W'}")
    shape = (int(m.shape[-2]), int(m.shape[-1]))
    border, corners = border_mask(shape), corner_masks(shape)
    if volume:  # in-plane masks through every axial slice
        depth = int(m.shape[-3])
        border = np.broadcast_to(border, (depth, *shape))
        corners = {k: np.broadcast_to(v, (depth, *shape)) for k, v in corners.items()}
    rows = []
    for i in range(len(m)):
        body = body_mask(img[i], volume=volume)
        for k in range(m.shape[1]):
            rows.append({"image": i, **_masses(np.clip(m[i, k], 0, None), body, border, corners)})
    return pd.DataFrame(rows)


def _masses(sal: np.ndarray, body: np.ndarray, border: np.ndarray, corners: dict[str, np.ndarray]) -> dict:
    total = float(sal.sum())

    def share(mask: np.ndarray) -> float:
        return float(sal[mask].sum()) / total if total > 0 else 0.0

    per_corner = {name: share(mask) for name, mask in corners.items()}
    best = max(per_corner, key=lambda c: per_corner[c])
    enrichment = per_corner[best] / float(corners[best].mean())
    row = {"outside_body_mass": share(~body), "border_mass": share(border), "corner_mass": per_corner[best],
           "corner": best if total > 0 else "", "corner_enrichment": enrichment,
           **{f"mass_{c}": v for c, v in per_corner.items()}}
    flags = [f"corner:{best}"] if total > 0 and enrichment >= CORNER_ENRICHMENT_FLAG else []
    flags += ["border"] if row["border_mass"] >= BORDER_FLAG else []
    flags += ["outside_body"] if row["outside_body_mass"] >= OUTSIDE_BODY_FLAG else []
    row["hint"] = ";".join(flags)
    return row


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)
