"""Synthetic chest CT volumes, written as DICOM CT series and as NIfTI: the offline sample data for volumes.

``generate_sample_volumes`` draws chest CT scans in Hounsfield units (body, subcutaneous fat, chest wall, ribs,
sternum, spine, lungs with a vessel tree and a dependent density gradient, heart, aorta, pulmonary trunk, airways,
diaphragm, liver, stomach, the scanner couch) and plants a lung nodule in the positives (label ``nodule`` vs
``normal``). Three simulated sites scan them differently (field of view, coverage, slice thickness, kernel
sharpness, noise, couch, vendor tags, signed or unsigned storage, slice numbering, prevalence). Two things are
planted for an evaluation to find: a *shortcut* (at one site, positives more often carry a metal skin marker
with its streak artefact: a technologist marking the area of concern) and a *weak site* (noisier).

Patients keep their anatomy across studies (about one in five has a follow-up, where a nodule persists and may
grow), so a split that is not patient-level leaks. Every identifier is an obvious fake (``DEMO^CT0001``).
The folder is built in a hidden sibling and renamed into place; ``.complete`` holds the parameters'
fingerprint, so a second call with the same arguments returns at once (see :mod:`.generate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.uid import generate_uid
from scipy import ndimage

from medtransfer.datasets.synthetic.generate import build_folder
from medtransfer.datasets.synthetic.plan import patients_and_studies
from medtransfer.datasets.synthetic.volume_anatomy import (
    Grid,
    Torso,
    draw_torso,
    metal_streaks,
    render_ct,
    skin_point,
)
from medtransfer.datasets.synthetic.volume_writers import SeriesGeometry, write_ct_series, write_nifti
from medtransfer.errors import ConfigError, MedtransferError

logger = logging.getLogger(__name__)

#: Bump when a change makes the generator write different files for the same knobs (it is in the fingerprint).
VOLUME_GENERATOR_VERSION = 1
_GENERATOR_NAME = "medtransfer.sample_volumes"
LABELS = ("normal", "nodule")


@dataclass(frozen=True)
class CTSiteProfile:
    """How one simulated hospital's CT scanner acquires, reconstructs and stores a chest CT."""

    manufacturer: str
    model: str
    institution: str
    station: str
    kernel: str  # ConvolutionKernel
    blur_mm: float  # in-plane point-spread (Gaussian sigma) of the reconstruction kernel
    noise_hu: float  # noise standard deviation for an average patient
    grain_mm: float  # noise correlation length (sharp kernels give fine grain)
    fov_mm: float  # reconstruction field of view (columns x pixel spacing)
    coverage_mm: float  # scan length (slices x spacing)
    thickness_ratio: float  # SliceThickness / spacing between slices (> 1: overlapping reconstruction)
    kvp: float
    table: str  # couch profile: "flat", "curved" or "thick"
    signed: bool  # int16 pixels with RescaleIntercept 0, else uint16 (12 bits stored) with -1024
    windows: tuple[tuple[int, int], ...]  # (WindowCenter, WindowWidth) presets in the header
    descending: bool  # InstanceNumber 1 is the most superior slice
    prevalence: float  # fraction of patients with a nodule


CT_SITES: dict[str, CTSiteProfile] = {
    "A": CTSiteProfile("Acme Medical Systems", "ACME Helix 64", "Northside General Hospital (DEMO)", "NSGH-CT01",
                       "STANDARD", 1.6, 14.0, 1.5, 380.0, 300.0, 1.0, 120.0, "flat", False, ((40, 400),),
                       False, 0.4),
    "B": CTSiteProfile("Borealis Imaging", "Borealis Spectra 128", "Bayview University Clinic (DEMO)", "BUC-CT02",
                       "LUNG-SHARP", 0.7, 26.0, 0.8, 360.0, 290.0, 1.25, 120.0, "curved", True, ((-600, 1500),),
                       True, 0.5),
    "C": CTSiteProfile("Cirrus Radiology", "Cirrus CT-Compact 16", "Coastal Community Hospital (DEMO)", "CCH-CT03",
                       "SOFT-B", 2.2, 18.0, 2.0, 420.0, 340.0, 1.5, 110.0, "thick", False,
                       ((40, 400), (-600, 1500)), False, 0.6),
}


@dataclass(frozen=True)
class VolumeDataConfig:
    """All knobs of the volume generator; the fingerprint of this object decides whether a folder is up to date."""

    n: int = 160
    seed: int = 0
    size: tuple[int, int, int] = (32, 64, 64)  # (D, H, W): slices, rows, columns
    sites: tuple[str, ...] = ("A", "B", "C")
    shortcut: bool = True
    shortcut_site: str | None = "B"  # where positives carry the skin marker more often (None: every site)
    shortcut_strength: float = 0.7  # P(a positive at the shortcut site carries the marker)
    marker_rate: float = 0.04  # P(any case carries the marker anyway)
    weak_site: str | None = "C"
    weak_noise: float = 1.8  # noise multiplier at the weak site
    nodule_mm: tuple[float, float] = (15.0, 40.0)  # nodule diameter range (log-uniform)
    follow_up_fraction: float = 0.2  # of patients who get a second study

    def __post_init__(self) -> None:
        unknown = [s for s in self.sites if s not in CT_SITES]
        if unknown or not self.sites:
            raise ConfigError(f"sites={self.sites!r}: choose from {sorted(CT_SITES)}")
        for name in ("weak_site", "shortcut_site"):
            value = getattr(self, name)
            if value is not None and value not in self.sites:
                raise ConfigError(f"{name}={value!r} is not one of sites={self.sites!r} (or use None)")
        if len(self.size) != 3 or not (8 <= self.size[0] <= 512 and all(16 <= s <= 1024 for s in self.size[1:])):
            raise ConfigError(f"size={self.size!r}: need (D, H, W) with 8 <= D <= 512 and 16 <= H, W <= 1024")
        if len(self.nodule_mm) != 2:
            raise ConfigError(f"nodule_mm={self.nodule_mm!r}: give (smallest, largest) diameter in mm")
        lo, hi = self.nodule_mm
        if not (self.n >= 4 and 0 <= self.shortcut_strength <= 1 and 0 <= self.marker_rate <= 1
                and self.weak_noise >= 0 and 3 <= lo <= hi <= 40 and 0 <= self.follow_up_fraction <= 1):
            raise ConfigError(f"n={self.n} (>= 4), shortcut_strength={self.shortcut_strength} and marker_rate="
                              f"{self.marker_rate} (in [0, 1]), weak_noise={self.weak_noise} (>= 0), nodule_mm="
                              f"{self.nodule_mm} (3 <= low <= high <= 40), follow_up_fraction="
                              f"{self.follow_up_fraction} (in [0, 1]): fix the value out of range")

    def fingerprint(self) -> str:
        """Stable hash of every knob and the generator version."""
        blob = json.dumps({"version": VOLUME_GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate_sample_volumes(
    out_dir: str | os.PathLike[str],
    *,
    n: int = 160,
    seed: int = 0,
    size: tuple[int, int, int] = (32, 64, 64),
    sites: tuple[str, ...] = ("A", "B", "C"),
    shortcut: bool = True,
    shortcut_site: str | None = "B",
    shortcut_strength: float = 0.7,
    weak_site: str | None = "C",
    weak_noise: float = 1.8,
    nodule_mm: tuple[float, float] = (15.0, 40.0),
    overwrite: bool = False,
) -> Path:
    """Write synthetic multi-site chest CT scans as DICOM series and NIfTI to ``out_dir``; return the folder.

    Idempotent: a folder already holding a complete data set with the same parameters is returned untouched
    (unless ``overwrite``); one made with other parameters is replaced. A folder that this function did not
    make is never deleted.

    Args:
        out_dir: destination; gets ``dicom/``, ``nifti/``, ``labels.csv`` (paths: DICOM series folders),
            ``labels_nifti.csv`` (same rows, paths: NIfTI files), ``generation.json``, ``README.md``, ``.truth/``.
        n: number of CT studies (about one patient in five has two).
        seed: everything is drawn from it; same arguments give byte-identical files.
        size: (slices, rows, columns) of every volume. The sites' coverage and field of view are fixed in mm,
            so the voxel size follows (about 9 x 6 x 6 mm at the default (32, 64, 64)).
        sites: which simulated scanners (``CT_SITES``) to use.
        shortcut: plant the skin marker shortcut (positives at ``shortcut_site`` carry it more often).
        shortcut_site: the site with the shortcut, or None for every site.
        shortcut_strength: probability that a positive there carries the marker.
        weak_site: the site whose noise is multiplied by ``weak_noise`` (a planted subgroup gap), or None.
        weak_noise: that multiplier.
        nodule_mm: range of nodule diameters (mm); larger is easier.
        overwrite: regenerate even when an up-to-date data set is present.

    Raises:
        ConfigError: invalid knobs.
        MedtransferError: ``out_dir`` is a non-empty folder that was not made by this function.

    Examples:
        >>> root = generate_sample_volumes("sample_data/ct", n=160, seed=0)  # doctest: +SKIP
        >>> # medtransfer train sample_data/ct --labels sample_data/ct/labels.csv --set "input.size=[32,64,64]"
    """
    shape: Any = tuple(int(s) for s in size)  # the config checks that it has three entries
    diameters: Any = tuple(float(v) for v in nodule_mm)
    cfg = VolumeDataConfig(n=n, seed=seed, size=shape, sites=tuple(sites), shortcut=shortcut,
                           shortcut_site=shortcut_site, shortcut_strength=shortcut_strength, weak_site=weak_site,
                           weak_noise=weak_noise, nodule_mm=diameters)
    out = Path(out_dir)
    if build_folder(out, cfg.fingerprint(), lambda tmp: _build(tmp, cfg), maker="generate_sample_volumes",
                    overwrite=overwrite):
        logger.info("wrote %d synthetic CT volumes to %s", n, out)
    return out


def sample_volume_truth(out_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-study ground truth of a generated volume data set (for tests, demos and saliency checks).

    Columns: path (DICOM series folder), nifti, label, site, patient_id, study, study_id, sex, age, nodule
    (bool), nodule_d/h/w (voxel of its centre in the (D, H, W) volume; -1 if none), nodule_mm (diameter),
    nodule_hu, nodule_solid, marker (bool), marker_d/h/w, pixel_mm, spacing_mm, thickness_mm, noise_hu.

    Raises:
        MedtransferError: ``out_dir`` holds no generated volume data set.
    """
    path = Path(out_dir) / ".truth" / "truth.csv"
    if not path.is_file():
        raise MedtransferError(f"{path} not found: run generate_sample_volumes({str(out_dir)!r}) first")
    return pd.read_csv(path, keep_default_na=False)


def plan_volume_cases(cfg: VolumeDataConfig) -> pd.DataFrame:
    """Who is scanned where: one row per study, sorted by site, patient and study.

    Labels belong to patients (a nodule persists into the follow-up); per-site prevalence among patients is
    exact (rounded). Returns columns index, patient (1-based), study (1 or 2), site, sex, age, label (bool),
    marker (bool) and date (YYYYMMDD).
    """
    rng = np.random.default_rng([cfg.seed, 11])
    n_pat, pat_site, pat, study = patients_and_studies(rng, cfg.n, cfg.follow_up_fraction, cfg.sites,
                                                       min_patients=2)
    sex = np.where(rng.random(n_pat) < 0.5, "M", "F")
    age = rng.integers(35, 90, n_pat)
    positive = np.zeros(n_pat, bool)
    for s in cfg.sites:
        idx = np.flatnonzero(pat_site == s)
        positive[rng.choice(idx, size=round(CT_SITES[s].prevalence * len(idx)), replace=False)] = True
    label = positive[pat]
    site = pat_site[pat]
    incidental, planted = rng.random(cfg.n), rng.random(cfg.n)  # drawn either way: the shortcut changes nothing else
    at_site = site == cfg.shortcut_site if cfg.shortcut_site is not None else np.ones(cfg.n, bool)
    marker = (incidental < cfg.marker_rate) | (cfg.shortcut & label & at_site & (planted < cfg.shortcut_strength))
    delta = (study - 1) * rng.integers(60, 400, cfg.n)  # days from the first study to the follow-up
    days = rng.integers(0, 1000, n_pat)[pat] + delta
    plan = pd.DataFrame({
        "patient": pat + 1, "study": study, "site": site, "sex": sex[pat],
        "age": np.minimum(age[pat] + (delta >= 365), 90), "label": label, "marker": marker,
        "date": [(date(2019, 1, 1) + timedelta(days=int(d))).strftime("%Y%m%d") for d in days],
    })
    plan = plan.sort_values(["site", "patient", "study"], kind="stable").reset_index(drop=True)
    return plan.assign(index=np.arange(cfg.n))[["index", *plan.columns]]


def _build(root: Path, cfg: VolumeDataConfig) -> None:
    plan = plan_volume_cases(cfg)
    torsos: dict[int, Torso] = {}
    truth = []
    for row in plan.itertuples(index=False):
        if row.patient not in torsos:
            rng = np.random.default_rng([cfg.seed, 12, row.patient])
            torsos[row.patient] = draw_torso(rng, row.sex, row.age, row.label, cfg.nodule_mm)
        truth.append(_write_case(root, row, torsos[row.patient], cfg))
    table = pd.DataFrame(truth)
    (root / ".truth").mkdir()
    table.to_csv(root / ".truth" / "truth.csv", index=False, lineterminator="\n")
    columns = ["path", "label", "patient_id", "study_id", "sex", "age", "site"]
    table[columns].to_csv(root / "labels.csv", index=False, lineterminator="\n")
    table[columns].assign(path=table.nifti).to_csv(root / "labels_nifti.csv", index=False, lineterminator="\n")
    info = _description(table, cfg)
    (root / "generation.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (root / "README.md").write_text(_readme(info), encoding="utf-8")


def _write_case(root: Path, row: Any, torso: Torso, cfg: VolumeDataConfig) -> dict[str, Any]:
    """Scan one study (geometry, rendering, scanner blur and noise, marker artefact), write it, return its truth."""
    site = CT_SITES[row.site]
    rng = np.random.default_rng([cfg.seed, 13, row.index])
    geometry, grid = _scan_geometry(rng, site, torso, cfg.size)
    growth = rng.uniform(1.0, 1.3)
    skin = skin_point(rng, torso)
    phases = rng.uniform(0, 2 * np.pi, 3)  # every draw happens with or without a marker (shortcut=False)
    if row.study > 1:  # nodules persist into the follow-up and may grow
        torso = dataclasses.replace(torso, nodules=tuple(dataclasses.replace(n, diameter=n.diameter * growth)
                                                         for n in torso.nodules))
    marker = skin if row.marker else None
    hu, _ = render_ct(torso, grid, rng, table=site.table, marker=marker)
    noise = site.noise_hu * (torso.body_a * torso.body_b / (160.0 * 107.0)) ** 0.75  # larger patients: noisier
    noise *= cfg.weak_noise if row.site == cfg.weak_site else 1.0
    hu = _acquire(hu, rng, site, geometry, noise)
    found = {"marker_d": -1, "marker_h": -1, "marker_w": -1}
    if marker is not None:
        voxel = _voxel(marker, grid)
        for k, z in enumerate(grid.z):  # the artefact is in-plane, in every slice whose profile holds the bead
            overlap = np.clip((geometry.thickness / 2 + 3.5 - abs(float(z) - marker[2])) / 3.5, 0, 1)
            if overlap > 0:
                hu[k] += metal_streaks(hu.shape[1:], voxel[1:], phases, 300.0 * overlap, 90.0 / geometry.pixel)
        found = dict(zip(("marker_d", "marker_h", "marker_w"), (int(round(v)) for v in voxel), strict=True))
    values = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    pid = f"DEMO-CT{row.patient:04d}"
    rel, nifti = f"dicom/{row.site}/{pid}/study-{row.study}", f"nifti/{pid}_study-{row.study}.nii.gz"
    stored = values if site.signed else (values.astype(np.int32) + 1024).astype(np.uint16)
    uids = [_uid(cfg, row.patient, row.study, "slice", k) for k in range(len(grid.z))]
    write_ct_series(root / rel, stored, geometry, _series_tags(row, site, cfg, pid, geometry),
                    uids, descending=site.descending)
    write_nifti(root / nifti, values, geometry)
    n = torso.nodules[0] if torso.nodules else None  # the largest
    centre = _voxel((n.x, n.y, n.z), grid) if n is not None else (-1, -1, -1)
    return {"path": rel, "nifti": nifti, "label": LABELS[int(row.label)], "patient_id": pid,
            "study_id": f"{pid}-S{row.study}", "sex": row.sex, "age": int(row.age), "site": row.site,
            "study": row.study, "nodule": n is not None, "n_nodules": len(torso.nodules),
            **dict(zip(("nodule_d", "nodule_h", "nodule_w"), (int(round(v)) for v in centre), strict=True)),
            "nodule_mm": round(n.diameter, 2) if n else 0.0, "nodule_hu": round(n.hu, 1) if n else 0.0,
            "nodule_solid": bool(n.solid) if n else False, "marker": bool(row.marker), **found,
            "pixel_mm": geometry.pixel, "spacing_mm": geometry.spacing, "thickness_mm": geometry.thickness,
            "noise_hu": round(noise, 2)}


def _scan_geometry(rng: np.random.Generator, site: CTSiteProfile, torso: Torso,
                   size: tuple[int, int, int]) -> tuple[SeriesGeometry, Grid]:
    """Where the scanner puts the voxels: its DICOM geometry, and the voxel centres in the patient frame.

    The field of view is centred on the isocentre; the patient lies a little off it, and the scan is centred
    on the lungs (with some jitter) at a table position around z = -600 mm.
    """
    d, h, w = size
    pixel = round((site.fov_mm + rng.normal(0, 8)) / w, 4)
    spacing = round(site.coverage_mm / d, 3)
    offset = np.array([rng.normal(0, 6), rng.normal(0, 8), -600 + rng.normal(0, 40)])  # patient frame → LPS
    centre = (torso.lung_top + torso.dome) / 2 + rng.normal(0, 8)
    origin = (round(-(w - 1) / 2 * pixel, 3), round(-(h - 1) / 2 * pixel, 3),
              round(centre + offset[2] - (d - 1) / 2 * spacing, 3))
    geometry = SeriesGeometry(origin, pixel, spacing, round(spacing * site.thickness_ratio, 3))
    grid = Grid(x=(origin[0] + np.arange(w) * pixel - offset[0]).astype(np.float32),
                y=(origin[1] + np.arange(h) * pixel - offset[1]).astype(np.float32),
                z=(origin[2] + np.arange(d) * spacing - offset[2]).astype(np.float32))
    return geometry, grid


def _acquire(hu: np.ndarray, rng: np.random.Generator, site: CTSiteProfile, geometry: SeriesGeometry,
             noise: float) -> np.ndarray:
    """The scanner's image of the ideal HU: slice profile and kernel blur, then kernel-shaped noise (``noise`` HU)."""
    z_sigma = geometry.thickness / 2.355 / geometry.spacing  # slice profile: FWHM = SliceThickness
    hu = ndimage.gaussian_filter(hu, (z_sigma, site.blur_mm / geometry.pixel, site.blur_mm / geometry.pixel))
    grain = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32),
                                    (0.5, site.grain_mm / geometry.pixel, site.grain_mm / geometry.pixel))
    return hu + noise * grain / (grain.std() + 1e-6)


def _voxel(point: tuple[float, float, float], grid: Grid) -> tuple[float, float, float]:
    """(d, h, w) voxel coordinates (fractional) of a patient-frame point (x, y, z mm)."""
    dz, dy, dx = grid.spacing
    x, y, z = point
    return (z - float(grid.z[0])) / dz, (y - float(grid.y[0])) / dy, (x - float(grid.x[0])) / dx


def _series_tags(row: Any, site: CTSiteProfile, cfg: VolumeDataConfig, pid: str,
                 geometry: SeriesGeometry) -> dict[str, object]:
    """Attributes shared by every slice of a study's series (patient, study, series, equipment, CT image)."""
    centres, widths = zip(*site.windows, strict=True)
    return {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "PatientName": f"DEMO^CT{row.patient:04d}", "PatientID": pid, "PatientBirthDate": "",
        "PatientSex": row.sex, "PatientAge": f"{row.age:03d}Y",
        "StudyInstanceUID": _uid(cfg, row.patient, row.study, "study"), "StudyDate": row.date,
        "StudyTime": "101500", "ReferringPhysicianName": "", "StudyID": str(row.study),
        "AccessionNumber": f"DEMOCT{row.patient:04d}{row.study}", "StudyDescription": "CT CHEST",
        "SeriesInstanceUID": _uid(cfg, row.patient, row.study, "series"), "SeriesNumber": 2,
        "SeriesDate": row.date, "SeriesTime": "101800", "ContentDate": row.date, "ContentTime": "101800",
        "AcquisitionNumber": 1, "Modality": "CT", "BodyPartExamined": "CHEST", "PatientPosition": "HFS",
        "SeriesDescription": f"CHEST {site.kernel} {geometry.thickness:g}mm",
        "FrameOfReferenceUID": _uid(cfg, row.patient, row.study, "frame"), "PositionReferenceIndicator": "",
        "Manufacturer": site.manufacturer, "ManufacturerModelName": site.model,
        "InstitutionName": site.institution, "StationName": site.station,
        "KVP": site.kvp, "ConvolutionKernel": site.kernel,
        "ReconstructionDiameter": round(geometry.pixel * cfg.size[2], 2),
        "RescaleIntercept": 0 if site.signed else -1024, "RescaleSlope": 1, "RescaleType": "HU",
        "WindowCenter": list(centres) if len(centres) > 1 else centres[0],
        "WindowWidth": list(widths) if len(widths) > 1 else widths[0],
        "BitsStored": 16 if site.signed else 12,
    }


def _uid(cfg: VolumeDataConfig, *parts: object) -> str:
    return generate_uid(entropy_srcs=["medtransfer-sample-volumes", cfg.fingerprint(), *map(str, parts)])


def _description(table: pd.DataFrame, cfg: VolumeDataConfig) -> dict[str, Any]:
    """generation.json: parameters, per-site profile and counts, and what is planted, for people and tests."""
    sites = {}
    for s in cfg.sites:
        here = table[table.site == s]
        pos, neg = here[here.label == "nodule"], here[here.label == "normal"]
        sites[s] = {**asdict(CT_SITES[s]), "studies": len(here),
                    "prevalence": round(float(len(pos) / max(1, len(here))), 4),
                    "marker_in_positives": round(float(pos.marker.mean()), 4) if len(pos) else None,
                    "marker_in_negatives": round(float(neg.marker.mean()), 4) if len(neg) else None}
    where = f"site {cfg.shortcut_site}" if cfg.shortcut_site else "every site"
    planted = {
        "lesion": (f"label 'nodule': one lung nodule per positive patient, diameter {cfg.nodule_mm[0]:g}-"
                   f"{cfg.nodule_mm[1]:g} mm (log-uniform), 75% solid (about 30 HU), 25% subsolid (-550 to -250 "
                   "HU), lobulated, anywhere in either lung; it persists into a follow-up study and may grow up "
                   "to 30%. Centre voxel and size per study in .truth/truth.csv."),
        "shortcut": (f"metal skin marker (a 7 mm bead at 3071 HU on the anterior or lateral chest wall, with "
                     f"streak artefact in its slices): {cfg.shortcut_strength:.0%} of positives at {where} carry "
                     f"it, and {cfg.marker_rate:.0%} of all studies anyway" if cfg.shortcut else
                     f"none (the marker is on {cfg.marker_rate:.0%} of all studies, unrelated to the label)"),
        "weak_site": (f"site {cfg.weak_site}: noise x{cfg.weak_noise:g}, on top of its thick overlapping "
                      "slices and wide field of view, so small and subsolid nodules are harder there"
                      if cfg.weak_site else "none"),
        "site_effects": ("field of view (pixel size), coverage (slice spacing), slice thickness, kernel "
                         "sharpness, noise level and grain, couch profile, tube voltage, vendor tags, signed "
                         "or unsigned storage, slice numbering order (site B numbers from the top), prevalence"),
        "patients": "about one in five patients has a follow-up study: same anatomy, same label",
    }
    d, h, w = cfg.size
    return {"generator": _GENERATOR_NAME, "version": VOLUME_GENERATOR_VERSION, "fingerprint": cfg.fingerprint(),
            "params": asdict(cfg), "studies": len(table), "patients": int(table.patient_id.nunique()),
            "labels": {k: int(v) for k, v in table.label.value_counts().sort_index().items()},
            "sites": sites, "planted": planted,
            "layout": {"labels.csv": "path,label,patient_id,study_id,sex,age,site; path = DICOM series folder",
                       "labels_nifti.csv": "the same rows; path = NIfTI file",
                       "dicom": f"dicom/<site>/<patient_id>/study-<k>/IM-<nnnn>.dcm: {d} axial slices of "
                                f"{h}x{w}, CT Image Storage, HU = stored * RescaleSlope + RescaleIntercept",
                       "nifti": "nifti/<patient_id>_study-<k>.nii.gz: int16 HU in RAS+ voxel order, affine "
                                "(qform = sform, scanner) matching the DICOM geometry",
                       ".truth/truth.csv": "ground truth per study (sample_volume_truth)"}}


def _readme(info: dict[str, Any]) -> str:
    planted = "\n".join(f"- **{k}**: {v}" for k, v in info["planted"].items())
    layout = "\n".join(f"- `{k}`: {v}" for k, v in info["layout"].items())
    return (f"# Synthetic chest CT (DEMO data, no real patient)\n\nWritten by `medtransfer sample-data --volumes` "
            f"({info['generator']} v{info['version']}): {info['studies']} studies of {info['patients']} patients "
            f"from {len(info['sites'])} simulated sites; labels {info['labels']}. Parameters and per-site profiles: "
            f"`generation.json`.\n\n## What is planted\n\n{planted}\n\n## Layout\n\n{layout}\n")
