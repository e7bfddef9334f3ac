"""The simulated hospitals and their scanners: detector response, noise, burned-in marker, stored bit depth.

The sites differ the way real ones do (vendor tags, CR vs DX, MONOCHROME1 polarity, 12 or 16 stored bits,
noise, gamma, unsharpness, prevalence, where technologists put the laterality marker), so a model trained on
the sample data meets the same site effects an evaluation by subgroup should expose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

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


def acquire(att: np.ndarray, site: SiteProfile, rng: np.random.Generator, size: int,
            noise_factor: float) -> np.ndarray:
    """Detector model: response curve, unsharpness and signal-dependent quantum noise; display space 0..1."""
    img = np.clip(att, 0, 1) ** site.gamma
    img = ndimage.gaussian_filter(img, site.blur * size / 256)
    sigma = site.noise * noise_factor * np.sqrt(img + 0.02)
    return np.clip(img + sigma * rng.standard_normal(img.shape), 0, 1)


def burn_marker(img: np.ndarray, corner: str, letter: str) -> None:
    """Burn a white lead-letter laterality marker (``letter`` "L" or "R") into ``corner`` of ``img`` (in place)."""
    size = img.shape[0]
    unit = max(1, round(size * 0.075 / 7))
    margin = max(2, round(size * 0.04))
    top = margin if corner[0] == "t" else size - margin - 7 * unit
    left = margin if corner[1] == "l" else size - margin - 5 * unit
    for x0, y0, w, h in _GLYPHS[letter]:
        img[top + y0 * unit: top + (y0 + h) * unit, left + x0 * unit: left + (x0 + w) * unit] = 1.0


def to_stored(img: np.ndarray, site: SiteProfile) -> np.ndarray:
    """Quantise display values (0..1) to the site's bit depth as uint16; MONOCHROME1 stores them inverted."""
    top = 2**site.bits_stored - 1
    stored = np.round(img * top)
    return (top - stored if site.photometric == "MONOCHROME1" else stored).astype(np.uint16)
