"""The chest phantom: anatomy drawn as soft-edged shapes in patient coordinates, and pneumonia-like opacities.

Attenuation images are float32, bright = dense, about 0..1. Everything is vectorised numpy and drawn from the
caller's generator in a fixed order, so an image is a pure function of its seed stream (changing the order of
any draw changes every file: bump ``GENERATOR_VERSION`` in ``plan.py`` when you do).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import expit


def patient_grid(size: int, rng: np.random.Generator, sex: str) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (x right, y down, about -1..1) with per-patient scale, shift and slight rotation."""
    c = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    scale = rng.normal(1.0 if sex == "M" else 0.95, 0.04)
    theta = np.deg2rad(rng.normal(0, 2.0))
    dx, dy = rng.normal(0, 0.03, 2)
    xs, ys = (xx - dx) / scale, (yy - dy) / scale
    xr, yr = xs * np.cos(theta) + ys * np.sin(theta), -xs * np.sin(theta) + ys * np.cos(theta)
    return xr.astype(np.float32), yr.astype(np.float32)


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, soft: float = 0.05,
            p: float = 2.0) -> np.ndarray:
    """Soft-edged (super)ellipse mask in [0, 1]."""
    dx, dy = (x - cx) / a, (y - cy) / b
    dx, dy = dx * dx, dy * dy
    r = dx + dy if p == 2 else dx * dx + dy * dy if p == 4 else dx ** (p / 2) + dy ** (p / 2)
    return expit((1 - r) / soft)


def _lung(x: np.ndarray, y: np.ndarray, s: int, rng: np.random.Generator,
          visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One lung (s=-1 image left = patient's right): rounded apex, convex lateral wall, diaphragm dome.

    Returns the lung mask (times ``visible``, i.e. minus heart and mediastinum) and the dome height per pixel.
    """
    a = rng.normal(0.36, 0.02)
    cx = s * rng.normal(0.42, 0.015)
    top, base = rng.normal(-0.8, 0.03), rng.normal(0.44 if s < 0 else 0.5, 0.03)
    t = np.clip((y - top) / (base - top), 0, 1)
    off = x - cx
    lateral = s * off > 0
    half = np.where(lateral, a * np.sqrt(1 - (1 - t) ** 2.2), 0.6 * a * np.sqrt(1 - (1 - t) ** 1.4))
    ub = off / a
    dome = base - rng.normal(0.13, 0.02) * np.clip(1 - ub**2, 0, 1) + 0.07 * np.clip(s * ub, 0, 1.5)
    return expit((half - np.abs(off)) / 0.012) * expit((dome - y) / 0.012) * (y > top) * visible, dome


def draw_anatomy(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, size: int, sex: str,
                 age: int) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation image (bright = dense, about 0..1) and the visible-lung mask."""
    body = _body(x, y, sex)
    hs = rng.normal(1.12 if age < 12 else 1.0, 0.06)
    hx = x - rng.normal(0.1, 0.02)
    hy = y - 0.3 - 0.3 * hx
    heart = ellipse(hx, hy, 0, 0, np.where(hx < 0, np.float32(0.28), np.float32(0.44)) * hs, 0.27 * hs, 0.05)
    med = expit((0.12 + 0.03 * expit((-0.45 - y) / 0.05) - np.abs(x - 0.02)) / 0.015)
    med = np.maximum(med, 0.7 * ellipse(x, y, 0.12, -0.36, 0.08, 0.07, 0.2))
    central = np.maximum(heart, med) * expit((y + 0.9) / 0.03)
    lungs = [_lung(x, y, s, rng, 1 - central) for s in (-1, 1)]
    lung = lungs[0][0] + lungs[1][0]
    abdomen = expit((y - np.minimum(lungs[0][1], lungs[1][1])) / 0.03)
    trachea = expit((0.035 - np.abs(x - 0.01)) / 0.01) * expit((-0.35 - y) / 0.05)
    att = 0.03 + 0.5 * body + 0.2 * np.maximum(central, abdomen) * body - 0.08 * trachea
    att -= rng.normal(0.36, 0.03) * lung * (1 - 0.2 * expit((y - 0.1) / 0.2))
    if sex == "F" and age >= 14:  # breast shadows over the lower zones
        att += 0.07 * sum(ellipse(x, y, s * 0.5, 0.36, 0.34, 0.22, 0.2) for s in (-1, 1)) * body
    if rng.random() < 0.6:  # gastric air bubble under the left hemidiaphragm
        att -= 0.12 * ellipse(x, y, 0.35, 0.62, 0.1, 0.06, 0.2) * (1 - lung)
    att += _bones(x, y, rng, age < 12) * body
    att += _vessels(x, y, [m for m, _ in lungs], rng, size)
    att += 0.025 * _smooth_noise(rng, size, 8) * body
    return att, lung


def _body(x: np.ndarray, y: np.ndarray, sex: str) -> np.ndarray:
    """Soft-tissue envelope: neck, sloping shoulders, chest wall narrowing slightly towards the abdomen."""
    shoulder = 0.97 if sex == "M" else 0.9
    half = 0.19 + (shoulder - 0.19) * expit((y + 0.84) / 0.05) - 0.06 * np.clip(y - 0.2, 0, None)
    return expit((half - np.abs(x)) / 0.02)


def _bones(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, child: bool) -> np.ndarray:
    """Spine with vertebrae, clavicles, humeral heads, posterior and anterior ribs (all vectorised)."""
    ax = np.abs(x)
    spine = expit((0.06 - np.abs(x - 0.01)) / 0.01) * (0.7 + 0.3 * np.cos(2 * np.pi * y / 0.09))
    u = np.clip((ax - 0.06) / 0.6, 0, 1)
    clav_y = -0.66 - 0.16 * u + 0.06 * np.sin(np.pi * u)
    clav = expit((0.03 - np.abs(y - clav_y)) / 0.008) * expit((0.68 - ax) / 0.02) * (ax > 0.05)
    heads = ellipse(ax, y, 0.92, -0.76, 0.14, 0.14, 0.08)
    thorax = ellipse(x, y, 0, -0.15, 0.84, 0.72, 0.06, 4)
    w = np.clip((ax - 0.04) / 0.8, 0, 1.2)  # posterior ribs: from the spine up, then down laterally
    post = _rib_family(y - (-0.1 * np.sin(np.pi * w) + (0.24 if child else 0.34) * w**2), -0.74, 0.105, 10,
                       0.026, rng)
    ant = _rib_family(y - 0.3 * (1 - w), -0.7, 0.13, 6, 0.022, rng) * expit((ax - 0.28) / 0.03)
    thorax *= expit((ax - 0.1) / 0.03)
    return 0.025 * spine + 0.2 * clav + 0.18 * heads + thorax * (0.1 * post + 0.045 * ant)


def _rib_family(v: np.ndarray, first: float, spacing: float, count: int, half: float,
                rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced bright bands along the curve coordinate ``v``; edges (cortex) brighter than the middle."""
    k = (v - first - rng.normal(0, 0.01)) / spacing
    d = np.abs(k - np.round(k)) * spacing
    keep = (k > -0.5) & (k < count - 0.5)
    return expit((half - d) / 0.006) * (0.6 + 0.4 * (d / half) ** 2) * keep


def _vessels(x: np.ndarray, y: np.ndarray, lungs: list[np.ndarray], rng: np.random.Generator,
             size: int) -> np.ndarray:
    """Hila and vascular markings: streaks radiating from each hilum, fading towards the periphery."""
    out = np.zeros_like(x)
    for s, lung in zip((-1, 1), lungs, strict=True):
        dx, dy = x - s * 0.17, y + 0.02
        r = np.hypot(dx, dy)
        polar = rng.standard_normal((10, 90)).clip(0, None).astype(np.float32)
        coords = np.stack([np.clip(r * 12, 0, 9), (np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * 89])
        streaks = ndimage.map_coordinates(polar, coords, order=1, mode="nearest")
        out += lung * (0.08 * streaks * np.exp(-r / 0.4) + 0.12 * np.exp(-((r / 0.1) ** 2)))
    return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean unit-variance noise with blobs about size/cells pixels wide (coarse grid, Gaussian upsampling)."""
    weights = _upsampler(size, cells)
    # einsum, not @: BLAS would start threads for these tiny products and burn a shared CPU spinning.
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    img = np.einsum("ik,lk->il", np.einsum("ij,jk->ik", weights, coarse), weights)
    return (img - img.mean()) / (img.std() + 1e-9)


@functools.lru_cache(maxsize=16)
def _upsampler(size: int, cells: int) -> np.ndarray:
    # (size, cells) matrix of normalised Gaussian weights: separable smooth interpolation by two matmuls.
    fine = (np.arange(size) + 0.5) / size * cells - 0.5
    w = np.exp(-(((fine[:, None] - np.arange(cells)[None, :]) / 0.8) ** 2))
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def add_opacities(att: np.ndarray, lung: np.ndarray, rng: np.random.Generator, size: int, positive: bool,
                  median: float, gain: float) -> dict[str, Any]:
    """Add 1-3 soft, patchy consolidations confined to the lungs (in place); return their ground truth.

    Contrast is log-normal (many subtle, a few dense) and scaled by ``gain`` (< 1 at the weak site).
    """
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])) if positive else 0
    total, found = np.zeros_like(att), [(0.0, 0.0, -1, -1)]
    if count:
        candidates = np.flatnonzero(ndimage.gaussian_filter(lung, size / 40).ravel() > 0.85)
        yy, xx = (np.mgrid[0:size, 0:size] / size).astype(np.float32)
        found = []
        for r0, c0 in zip(*np.divmod(rng.choice(candidates, size=count), size), strict=True):
            rad = rng.uniform(0.07, 0.2)
            c = float(np.clip(rng.lognormal(np.log(median), 0.6), median / 4, min(0.9, median * 2.8))) * gain
            ry, rx = rad * rng.uniform(0.7, 1.4, 2)
            blob = np.exp(-((((yy - r0 / size) / ry) ** 2 + ((xx - c0 / size) / rx) ** 2) ** 2))
            total = np.maximum(total, c * blob * expit(1.2 * _smooth_noise(rng, size, 14) + 1.5))
            found.append((c, rad * size, int(r0), int(c0)))
        total *= np.clip(lung, 0, 1)
        att += total
    covered = float(((total > 0.02) & (lung > 0.5)).sum() / max(1, (lung > 0.5).sum()))
    return {"n_opacities": count, "opacity_contrast": round(max(f[0] for f in found), 4),
            "opacity_radius_px": round(max(f[1] for f in found), 2), "opacity_row": found[0][2],
            "opacity_col": found[0][3], "opacity_area_frac": round(covered, 4)}
