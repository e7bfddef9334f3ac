"""The generator's knobs and its case plan: which patients are scanned where, with which label and marker.

Every random draw here comes from ``np.random.default_rng([seed, 1])`` in a fixed order; the per-image draws
(anatomy, opacities, noise) use their own streams, so the plan of a data set never depends on its image size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd

from medtransfer.datasets.synthetic.sites import SITES
from medtransfer.errors import ConfigError

#: Bump when a change makes the generator write different files for the same knobs (it is in the fingerprint).
GENERATOR_VERSION = 2
CORNERS = ("tl", "tr", "bl", "br")


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


def patients_and_studies(rng: np.random.Generator, n: int, second_fraction: float, sites: tuple[str, ...], *,
                         min_patients: int = 1) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Spread ``n`` studies over patients, about ``second_fraction`` of them with a second study.

    Returns ``(n_patients, site per patient, patient per study, study number per study)``: sites are dealt to
    patients in a balanced random order; every patient has study 1, the chosen ones also study 2.
    """
    n_pat = min(n, max(min_patients, round(n / (1 + second_fraction))))
    pat_site = rng.permutation(np.resize(np.array(sites), n_pat))
    second = np.sort(rng.choice(n_pat, size=n - n_pat, replace=False))
    pat = np.concatenate([np.arange(n_pat), second])
    study = np.concatenate([np.ones(n_pat, int), np.full(len(second), 2)])
    return n_pat, pat_site, pat, study


def plan_cases(cfg: SampleDataConfig) -> pd.DataFrame:
    """Who is scanned where: patients, sites, second studies, labels, demographics, marker corners.

    Returns:
        One row per image: index, patient (1-based), study (1 or 2), site, sex, age, label (bool), view,
        corner (of the laterality marker) and date (YYYYMMDD).
    """
    rng = np.random.default_rng([cfg.seed, 1])
    n_pat, pat_site, pat, study = patients_and_studies(rng, cfg.n, cfg.second_study_fraction, cfg.sites)
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
    other = np.array(CORNERS)[rng.integers(0, 4, len(site))]
    corner = np.where(rng.random(len(site)) < 0.85, home, other)
    moved = rng.random(len(site)) < cfg.shortcut_strength  # drawn either way: shortcut changes nothing else
    return np.where(cfg.shortcut & label & moved, "tl", corner)
