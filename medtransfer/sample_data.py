"""Synthetic chest radiographs written as real DICOM files: the offline sample data set.

``generate_sample_data`` draws frontal chest X-rays (body, lungs, heart, mediastinum, diaphragm, spine,
clavicles, ribs, vessels) with pneumonia-like opacities in the positives, and writes them as DICOM from three
simulated sites that differ the way real scanners do (noise, gamma, bit depth, polarity, vendor tags,
prevalence). It plants two things an evaluation should find: a *shortcut* (the burned-in laterality marker
sits top-left more often in positives) and a *weak site* (fainter opacities, more noise). Everything is drawn
from ``seed`` with vectorised numpy, so the same arguments give byte-identical files, in seconds.

The data set is built in a hidden sibling folder and renamed into place at the end, so an interrupted run never
leaves a half data set under the final name. Ground truth (marker corner, opacity size/position) is kept in
``.truth/truth.csv``, a hidden folder that scan indexing ignores; read it with :func:`sample_truth`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage
from scipy.special import expit

from medtransfer import io
from medtransfer.errors import ConfigError, MedtransferError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2
_MARKER = ".complete"
_CORNERS = ("tl", "tr", "bl", "br")
# Laterality glyphs on a 5x7 grid: (x0, y0, width, height) rectangles.
_GLYPHS = {
    "L": ((0, 0, 1, 7), (0, 6, 5, 1)),
    "R": ((0, 0, 1, 7), (0, 0, 4, 1), (0, 3, 4, 1), (4, 1, 1, 2), (2, 4, 1, 1), (3, 5, 1, 1), (4, 6, 1, 1)),
}


@dataclass(frozen=True)
class SiteProfile:
    """How one simulated hospital acquires and stores its radiographs."""

    manufacturer: str
    model: str
    institution: str
    station: str
    modality: str  # "CR" or "DX"
    photometric: str  # MONOCHROME1 stores inverted values (bright = low)
    bits_stored: int
    noise: float  # relative quantum noise
    gamma: float  # detector/processing response curve
    blur: float  # detector unsharpness, pixels at 256 px
    prevalence: float  # fraction of pneumonia images
    corner: str  # where this site's technologists usually put the laterality marker


SITES: dict[str, SiteProfile] = {
    "A": SiteProfile("Acme Medical Systems", "ACME CR-500", "Northside General Hospital (DEMO)", "NSGH-CR01",
                     "CR", "MONOCHROME2", 12, 0.020, 1.00, 0.9, 0.3, "tr"),
    "B": SiteProfile("Borealis Imaging", "BX-Digital 9", "Bayview University Clinic (DEMO)", "BUC-DX02",
                     "DX", "MONOCHROME1", 16, 0.014, 0.80, 0.4, 0.5, "br"),
    "C": SiteProfile("Cirrus Radiology", "Cirrus DR-Compact", "Coastal Community Hospital (DEMO)", "CCH-DX03",
                     "DX", "MONOCHROME2", 12, 0.026, 1.25, 0.6, 0.6, "bl"),
}


@dataclass(frozen=True)
class SampleDataConfig:
    """All knobs of the generator; the fingerprint of this object decides whether a folder is up to date."""

    n: int = 400
    seed: int = 0
    size: int = 256
    shortcut: bool = True
    weak_site: str | None = "C"
    sites: tuple[str, ...] = ("A", "B", "C")
    extras: bool = True
    second_study_fraction: float = 0.15  # of patients who get a second study
    shortcut_strength: float = 0.8  # P(positive gets its marker moved top-left)
    weak_contrast: float = 0.35  # opacity contrast multiplier at the weak site
    weak_noise: float = 1.7  # noise multiplier at the weak site
    opacity_contrast: float = 0.3  # median peak contrast of an opacity (log-normal; attenuation units)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise ConfigError(f"sites={self.sites!r}: choose from {sorted(SITES)}")
        if self.weak_site is not None and self.weak_site not in self.sites:
            raise ConfigError(f"weak_site={self.weak_site!r} is not one of sites={self.sites!r} (or use None)")
        if not (0 <= self.shortcut_strength <= 1 and self.weak_contrast >= 0 and self.weak_noise >= 0
                and 0 < self.opacity_contrast <= 1):
            raise ConfigError(f"shortcut_strength={self.shortcut_strength} must be in [0, 1]; weak_contrast="
                              f"{self.weak_contrast} and weak_noise={self.weak_noise} must be >= 0; opacity_contrast="
                              f"{self.opacity_contrast} must be in (0, 1]")
        if self.n < 2 or not 32 <= self.size <= 2048:
            raise ConfigError(f"n={self.n}, size={self.size}: need n >= 2 and 32 <= size <= 2048")

    def fingerprint(self) -> str:
        """Stable hash of every knob and the generator version."""
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate_sample_data(
    out_dir: str | os.PathLike[str],
    *,
    n: int = 400,
    seed: int = 0,
    size: int = 256,
    shortcut: bool = True,
    weak_site: str | None = "C",
    sites: tuple[str, ...] = ("A", "B", "C"),
    extras: bool = True,
    overwrite: bool = False,
    shortcut_strength: float = 0.8,
    weak_contrast: float = 0.35,
    weak_noise: float = 1.7,
    opacity_contrast: float = 0.3,
) -> Path:
    """Write a synthetic multi-site chest X-ray DICOM data set to ``out_dir`` and return the folder.

    Idempotent: a folder already holding a complete data set with the same parameters is returned untouched
    (unless ``overwrite``); one made with other parameters is replaced. A folder that this function did not
    make is never deleted.

    Args:
        out_dir: destination; gets ``dicom/``, ``labels.csv``, ``generation.json``, ``.truth/`` (+ ``extras/``).
        n: number of radiographs (about 15% of patients have two studies).
        seed: everything is drawn from it; same arguments give byte-identical files.
        size: image rows = columns.
        shortcut: plant a label-correlated marker position (positives get it top-left more often).
        weak_site: site whose opacities are fainter and noise higher (a planted subgroup gap), or None.
        sites: which of the simulated sites (``SITES``) to use.
        extras: also write NIfTI volumes and a CT series under ``extras/`` for ingestion tests.
        overwrite: regenerate even when an up-to-date data set is present.
        shortcut_strength: probability that a positive's marker is moved to the top-left (with ``shortcut``).
        weak_contrast, weak_noise: opacity-contrast and noise multipliers at ``weak_site``.
        opacity_contrast: median peak contrast of an opacity; higher makes the task easier.

    Raises:
        ConfigError: invalid knobs.
        MedtransferError: ``out_dir`` is a non-empty folder that was not made by this function.
    """
    cfg = SampleDataConfig(n=n, seed=seed, size=size, shortcut=shortcut, weak_site=weak_site,
                           sites=tuple(sites), extras=extras, shortcut_strength=shortcut_strength,
                           weak_contrast=weak_contrast, weak_noise=weak_noise, opacity_contrast=opacity_contrast)
    out = Path(out_dir)
    key = cfg.fingerprint()
    marker = out / _MARKER
    if not overwrite and marker.is_file() and marker.read_text().strip() == key:
        logger.info("sample data in %s is up to date", out)
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise MedtransferError(f"{out} is not empty and was not made by generate_sample_data; "
                               "choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        started = time.perf_counter()
        _build(tmp, cfg)
        (tmp / _MARKER).write_text(key + "\n")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d synthetic radiographs to %s in %.1f s", n, out, time.perf_counter() - started)
    return out


def sample_truth(out_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-image ground truth of a generated data set (for tests, demos and saliency checks).

    Columns: path, label, site, patient_id, study, sex, age, view, marker_corner, marker_letter,
    n_opacities, opacity_contrast, opacity_radius_px, opacity_row, opacity_col (first opacity; -1 if none),
    opacity_area_frac (fraction of lung pixels covered). It is kept out of ``labels.csv`` on purpose.
    """
    path = Path(out_dir) / ".truth" / "truth.csv"
    if not path.is_file():
        raise MedtransferError(f"{path} not found: run generate_sample_data({str(out_dir)!r}) first")
    return pd.read_csv(path, keep_default_na=False)


def _swap_in(tmp: Path, out: Path) -> None:
    # Rename the finished folder into place; an older data set is moved aside first, then deleted.
    old = None
    if out.exists():
        old = out.parent / f".old-{out.name}-{tmp.name[-8:]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(root: Path, cfg: SampleDataConfig) -> None:
    plan = _plan(cfg)
    truth = [_write_case(root, row, cfg) for row in plan.itertuples(index=False)]
    table = pd.DataFrame(truth).sort_values("path", kind="stable").reset_index(drop=True)
    (root / ".truth").mkdir()
    table[["path", "label"]].to_csv(root / "labels.csv", index=False, lineterminator="\n")
    table.to_csv(root / ".truth" / "truth.csv", index=False, lineterminator="\n")
    if cfg.extras:
        _write_extras(root / "extras", cfg)
    pos = table.assign(pos=table.label == "pneumonia").groupby("site").pos
    sites = {s: {**asdict(SITES[s]), "prevalence": round(float(pos.mean().get(s, 0.0)), 4), "images": int(pos.size().get(s, 0)),
                 "configured_prevalence": SITES[s].prevalence} for s in cfg.sites}
    info = {"generator": "medtransfer.sample_data", "version": GENERATOR_VERSION, "fingerprint": cfg.fingerprint(),
            "params": asdict(cfg), "images": len(table), "patients": int(table.patient_id.nunique()),
            "sites": sites, "layout": "dicom/<site>/<patient_id>/study-<k>.dcm; labels.csv: path,label"}
    (root / "generation.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _plan(cfg: SampleDataConfig) -> pd.DataFrame:
    """Who is scanned where: patients, sites, second studies, labels, demographics, marker corners."""
    rng = np.random.default_rng([cfg.seed, 1])
    n_pat = min(cfg.n, max(1, round(cfg.n / (1 + cfg.second_study_fraction))))
    pat_site = rng.permutation(np.resize(np.array(cfg.sites), n_pat))
    second = np.sort(rng.choice(n_pat, size=cfg.n - n_pat, replace=False))
    pat = np.concatenate([np.arange(n_pat), second])
    study = np.concatenate([np.ones(n_pat, int), np.full(len(second), 2)])
    site = pat_site[pat]
    sex = np.where(rng.random(n_pat) < 0.5, "M", "F")[pat]
    band = rng.choice(3, size=n_pat, p=[0.12, 0.63, 0.25])  # child / adult / elderly
    age0 = np.choose(band, [rng.integers(1, 18, n_pat), rng.integers(18, 70, n_pat), rng.integers(70, 90, n_pat)])
    age = np.minimum(age0[pat] + (study - 1) * rng.integers(0, 2, cfg.n), 90)
    label = np.zeros(cfg.n, bool)
    for s in cfg.sites:  # exact per-site prevalence, so small data sets still show the configured differences
        idx = np.flatnonzero(site == s)
        label[rng.choice(idx, size=round(SITES[s].prevalence * len(idx)), replace=False)] = True
    view = np.where(rng.random(cfg.n) < 0.2 + 0.15 * label, "AP", "PA")
    days = rng.integers(0, 1000, n_pat)[pat] + (study - 1) * rng.integers(14, 400, cfg.n)
    return pd.DataFrame({
        "index": np.arange(cfg.n), "patient": pat + 1, "study": study, "site": site, "sex": sex, "age": age,
        "label": label, "view": view, "corner": _marker_corners(rng, site, label, cfg),
        "date": [(date(2019, 1, 1) + timedelta(days=int(d))).strftime("%Y%m%d") for d in days],
    })


def _marker_corners(rng: np.random.Generator, site: np.ndarray, label: np.ndarray,
                    cfg: SampleDataConfig) -> np.ndarray:
    # Each site has a home corner (85%); the shortcut moves some positives' markers to the top-left.
    home = np.array([SITES[s].corner for s in site])
    other = np.array(_CORNERS)[rng.integers(0, 4, len(site))]
    corner = np.where(rng.random(len(site)) < 0.85, home, other)
    moved = rng.random(len(site)) < cfg.shortcut_strength  # drawn either way: shortcut changes nothing else
    return np.where(cfg.shortcut & label & moved, "tl", corner)


def _write_case(root: Path, row: Any, cfg: SampleDataConfig) -> dict[str, Any]:
    """Render one radiograph, write it as DICOM, return its ground-truth row."""
    site = SITES[row.site]
    rng = np.random.default_rng([cfg.seed, 2, row.index])
    x, y = _grid(cfg.size, rng, row.sex)
    att, lung = _anatomy(x, y, rng, cfg.size, row.sex, row.age)
    weak = row.site == cfg.weak_site
    truth = _opacities(att, lung, rng, cfg.size, row.label, cfg.opacity_contrast,
                       cfg.weak_contrast if weak else 1.0)
    img = _acquire(att, site, rng, cfg.size, cfg.weak_noise if weak else 1.0)
    letter = "R" if row.corner in ("tl", "bl") else "L"  # patient's right is on the image left
    _burn_marker(img, row.corner, letter)
    pid = f"DEMO-P{row.patient:04d}"
    rel = f"dicom/{row.site}/{pid}/study-{row.study}.dcm"
    _write_dicom(root / rel, _to_stored(img, site), row, site, cfg)
    return {"path": rel, "label": "pneumonia" if row.label else "normal", "site": row.site, "patient_id": pid,
            "study": row.study, "sex": row.sex, "age": row.age, "view": row.view, "marker_corner": row.corner,
            "marker_letter": letter, **truth}


def _grid(size: int, rng: np.random.Generator, sex: str) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (x right, y down, about -1..1) with per-patient scale, shift and slight rotation."""
    c = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    scale = rng.normal(1.0 if sex == "M" else 0.95, 0.04)
    theta = np.deg2rad(rng.normal(0, 2.0))
    dx, dy = rng.normal(0, 0.03, 2)
    xs, ys = (xx - dx) / scale, (yy - dy) / scale
    xr, yr = xs * np.cos(theta) + ys * np.sin(theta), -xs * np.sin(theta) + ys * np.cos(theta)
    return xr.astype(np.float32), yr.astype(np.float32)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, soft: float = 0.05,
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


def _anatomy(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, size: int, sex: str,
             age: int) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation image (bright = dense, about 0..1) and the visible-lung mask."""
    body = _body(x, y, sex)
    hs = rng.normal(1.12 if age < 12 else 1.0, 0.06)
    hx = x - rng.normal(0.1, 0.02)
    hy = y - 0.3 - 0.3 * hx
    heart = _ellipse(hx, hy, 0, 0, np.where(hx < 0, np.float32(0.28), np.float32(0.44)) * hs, 0.27 * hs, 0.05)
    med = expit((0.12 + 0.03 * expit((-0.45 - y) / 0.05) - np.abs(x - 0.02)) / 0.015)
    med = np.maximum(med, 0.7 * _ellipse(x, y, 0.12, -0.36, 0.08, 0.07, 0.2))
    central = np.maximum(heart, med) * expit((y + 0.9) / 0.03)
    lungs = [_lung(x, y, s, rng, 1 - central) for s in (-1, 1)]
    lung = lungs[0][0] + lungs[1][0]
    abdomen = expit((y - np.minimum(lungs[0][1], lungs[1][1])) / 0.03)
    trachea = expit((0.035 - np.abs(x - 0.01)) / 0.01) * expit((-0.35 - y) / 0.05)
    att = 0.03 + 0.5 * body + 0.2 * np.maximum(central, abdomen) * body - 0.08 * trachea
    att -= rng.normal(0.36, 0.03) * lung * (1 - 0.2 * expit((y - 0.1) / 0.2))
    if sex == "F" and age >= 14:  # breast shadows over the lower zones
        att += 0.07 * sum(_ellipse(x, y, s * 0.5, 0.36, 0.34, 0.22, 0.2) for s in (-1, 1)) * body
    if rng.random() < 0.6:  # gastric air bubble under the left hemidiaphragm
        att -= 0.12 * _ellipse(x, y, 0.35, 0.62, 0.1, 0.06, 0.2) * (1 - lung)
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
    heads = _ellipse(ax, y, 0.92, -0.76, 0.14, 0.14, 0.08)
    thorax = _ellipse(x, y, 0, -0.15, 0.84, 0.72, 0.06, 4)
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


def _opacities(att: np.ndarray, lung: np.ndarray, rng: np.random.Generator, size: int, positive: bool,
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


def _acquire(att: np.ndarray, site: SiteProfile, rng: np.random.Generator, size: int,
             noise_factor: float) -> np.ndarray:
    """Detector model: response curve, unsharpness and signal-dependent quantum noise; display space 0..1."""
    img = np.clip(att, 0, 1) ** site.gamma
    img = ndimage.gaussian_filter(img, site.blur * size / 256)
    sigma = site.noise * noise_factor * np.sqrt(img + 0.02)
    return np.clip(img + sigma * rng.standard_normal(img.shape), 0, 1)


def _burn_marker(img: np.ndarray, corner: str, letter: str) -> None:
    """Burn a white lead-letter laterality marker into a corner (in place)."""
    size = img.shape[0]
    unit = max(1, round(size * 0.075 / 7))
    margin = max(2, round(size * 0.04))
    top = margin if corner[0] == "t" else size - margin - 7 * unit
    left = margin if corner[1] == "l" else size - margin - 5 * unit
    for x0, y0, w, h in _GLYPHS[letter]:
        img[top + y0 * unit: top + (y0 + h) * unit, left + x0 * unit: left + (x0 + w) * unit] = 1.0


def _to_stored(img: np.ndarray, site: SiteProfile) -> np.ndarray:
    """Quantise display values to the site's bit depth; MONOCHROME1 stores them inverted."""
    top = 2**site.bits_stored - 1
    stored = np.round(img * top)
    return (top - stored if site.photometric == "MONOCHROME1" else stored).astype(np.uint16)


def _uid(cfg: SampleDataConfig, *parts: object) -> str:
    return generate_uid(entropy_srcs=["medtransfer-sample", cfg.fingerprint(), *map(str, parts)])


def _dataset(path: Path, sop_class: str, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def _set_pixels(ds: FileDataset, pixels: np.ndarray, bits_stored: int, photometric: str) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()


def _write_dicom(path: Path, pixels: np.ndarray, row: Any, site: SiteProfile, cfg: SampleDataConfig) -> None:
    """One radiograph with realistic header fields; all identifiers are obviously fake."""
    sop_class = ComputedRadiographyImageStorage if site.modality == "CR" else DigitalXRayImageStorageForPresentation
    ds = _dataset(path, sop_class, _uid(cfg, row.patient, row.study, "image"))
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = row.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"DEMOACC{row.patient:04d}{row.study}"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = site.modality, site.manufacturer, site.model
    ds.InstitutionName, ds.StationName = site.institution, site.station
    ds.StudyDescription, ds.BodyPartExamined, ds.ViewPosition = "CHEST", "CHEST", row.view
    ds.PatientName, ds.PatientID = f"DEMO^PATIENT{row.patient:04d}", f"DEMO-P{row.patient:04d}"
    ds.PatientSex, ds.PatientAge = row.sex, f"{row.age:03d}Y"
    ds.StudyInstanceUID = _uid(cfg, row.patient, row.study, "study")
    ds.SeriesInstanceUID = _uid(cfg, row.patient, row.study, "series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(row.study), 1, 1
    spacing = round(430.0 / cfg.size, 4)
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    top = 2**site.bits_stored - 1
    ds.WindowCenter, ds.WindowWidth = top // 2, top
    _set_pixels(ds, pixels, site.bits_stored, site.photometric)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_extras(root: Path, cfg: SampleDataConfig) -> None:
    """Three 32x32x16 NIfTI volumes and an 8-slice CT series (HU = stored - 1024) for ingestion tests."""
    import nibabel as nib

    rng = np.random.default_rng([cfg.seed, 3])
    z, yy, xx = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    for k in range(3):
        vol = 100 * _ellipse(xx, yy, 0, 0, 0.8, 0.9, 0.05) * (np.abs(z) < 0.9) + 50 * np.exp(
            -((xx - rng.uniform(-0.4, 0.4)) ** 2 + yy**2 + z**2) / 0.05) + rng.normal(0, 3, z.shape)
        img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0), dtype=np.float32),
                              np.diag([1.5, 1.5, 3.0, 1.0]))
        (root / "nifti").mkdir(parents=True, exist_ok=True)
        nib.save(img, str(root / "nifti" / f"volume-{k + 1}.nii.gz"))
    hu = -1000 + 1040 * _ellipse(xx, yy, 0, 0, 0.8, 0.7, 0.03) + 660 * _ellipse(xx, yy, 0, 0.5, 0.12, 0.12, 0.1)
    for i in range(8):
        ds = _dataset(root / "ct_series", CTImageStorage, _uid(cfg, "ct", i))
        ds.Modality, ds.Manufacturer, ds.PatientID, ds.PatientName = "CT", "DEMO", "DEMO-CT0001", "DEMO^CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(cfg, "ct", "study"), _uid(cfg, "ct", "series")
        ds.StudyDate, ds.InstanceNumber, ds.SliceThickness = "20200101", i + 1, 2.5
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-24.0, -24.0, 2.5 * i], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.RescaleIntercept, ds.RescaleSlope = [1.5, 1.5], -1024, 1
        _set_pixels(ds, (hu[2 * i] + 1024 + rng.normal(0, 10, (32, 32))).clip(0).astype(np.int16), 16, "MONOCHROME2")
        (root / "ct_series").mkdir(parents=True, exist_ok=True)
        ds.save_as(root / "ct_series" / f"slice-{i + 1:02d}.dcm", enforce_file_format=True)


def render_preview(out_dir: str | os.PathLike[str], png_path: str | os.PathLike[str], n: int = 8) -> Path:
    """Write a contact sheet of ``n`` images (both labels, all sites) to ``png_path`` and return it.

    Positives are the clearest ones of each site (most opacity), so the sheet shows what the task looks like;
    most positives are subtler. Images are shown as a radiologist would see them (MONOCHROME1 inverted back, percentile window);
    captions show site and label only, never identifiers.
    """
    import pydicom
    from PIL import Image, ImageDraw

    table = pd.read_csv(Path(out_dir) / "labels.csv")
    table["site"] = table.path.str.split("/").str[1]
    if (Path(out_dir) / ".truth" / "truth.csv").is_file():  # show the clearest positives first
        truth = sample_truth(out_dir)
        table = table.assign(clear=-truth.opacity_contrast * truth.opacity_area_frac).sort_values("clear")
    table["rank"] = table.groupby(["site", "label"]).cumcount()
    picks = table.sort_values(["rank", "label", "site"]).head(n)
    tile, cols = 256, min(4, n)
    sheet = Image.new("L", (cols * tile, -(-len(picks) // cols) * (tile + 18)), 0)
    draw = ImageDraw.Draw(sheet)
    for k, item in enumerate(picks.itertuples()):
        ds = pydicom.dcmread(Path(out_dir) / item.path)
        arr = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
        lo, hi = np.percentile(arr, [0.5, 99.5])
        arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255
        left, top = (k % cols) * tile, (k // cols) * (tile + 18)
        sheet.paste(Image.fromarray(arr.astype(np.uint8)).resize((tile, tile)), (left, top + 18))
        draw.text((left + 4, top + 3), f"site {item.site} - {item.label}", fill=255)
    with io.atomic_path(png_path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(png_path)
