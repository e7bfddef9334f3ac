"""Build the sample data set folder: plan the cases, draw and write each image, then rename the folder into place.

The folder is built in a hidden sibling and renamed over the final name at the end (the previous data set is
moved aside first), so an interrupted run never leaves a half data set under the final name. A ``.complete``
marker holding the config fingerprint makes the call idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer.datasets.synthetic.anatomy import add_opacities, draw_anatomy, patient_grid
from medtransfer.datasets.synthetic.plan import GENERATOR_VERSION, SampleDataConfig, plan_cases
from medtransfer.datasets.synthetic.sites import SITES, acquire, burn_marker, to_stored
from medtransfer.datasets.synthetic.writers import write_dicom, write_extras
from medtransfer.errors import MedtransferError

logger = logging.getLogger(__name__)

_MARKER = ".complete"
# The generator's name as recorded in generation.json. It is data, not an import path: it keeps the name the
# generator had when GENERATOR_VERSION 2 was fixed, so that the same knobs keep giving the same bytes.
_GENERATOR_NAME = "medtransfer.sample_data"


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

    Examples:
        >>> root = generate_sample_data("sample_data/cxr", n=300, seed=0)  # doctest: +SKIP
    """
    cfg = SampleDataConfig(n=n, seed=seed, size=size, shortcut=shortcut, weak_site=weak_site,
                           sites=tuple(sites), extras=extras, shortcut_strength=shortcut_strength,
                           weak_contrast=weak_contrast, weak_noise=weak_noise, opacity_contrast=opacity_contrast)
    out = Path(out_dir)
    if build_folder(out, cfg.fingerprint(), lambda tmp: _build(tmp, cfg), maker="generate_sample_data",
                    overwrite=overwrite):
        logger.info("wrote %d synthetic radiographs to %s", n, out)
    return out


def build_folder(out: Path, key: str, build: Callable[[Path], None], *, maker: str, overwrite: bool) -> bool:
    """Build a generated data set folder atomically and idempotently; returns False when it was up to date.

    ``build`` fills a hidden sibling folder, which is renamed over ``out`` at the end (the previous folder moved
    aside first), so an interrupted run never leaves half a data set under the final name; a ``.complete``
    marker holding ``key`` (the generator's settings) makes a second call with the same settings a no-op.

    Raises:
        MedtransferError: ``out`` is a non-empty folder that ``maker`` did not make (it is never deleted).
    """
    marker = out / _MARKER
    if not overwrite and marker.is_file() and marker.read_text().strip() == key:
        logger.info("%s is up to date", out)
        return False
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise MedtransferError(f"{out} is not empty and was not made by {maker}; choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        started = time.perf_counter()
        build(tmp)
        (tmp / _MARKER).write_text(key + "\n")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built %s in %.1f s", out, time.perf_counter() - started)
    return True


def sample_truth(out_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-image ground truth of a generated data set (for tests, demos and saliency checks).

    Columns: path, label, site, patient_id, study, sex, age, view, marker_corner, marker_letter,
    n_opacities, opacity_contrast, opacity_radius_px, opacity_row, opacity_col (first opacity; -1 if none),
    opacity_area_frac (fraction of lung pixels covered). It is kept out of ``labels.csv`` on purpose.

    Raises:
        MedtransferError: ``out_dir`` holds no generated data set.
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
    plan = plan_cases(cfg)
    truth = [_write_case(root, row, cfg) for row in plan.itertuples(index=False)]
    table = pd.DataFrame(truth).sort_values("path", kind="stable").reset_index(drop=True)
    (root / ".truth").mkdir()
    table[["path", "label"]].to_csv(root / "labels.csv", index=False, lineterminator="\n")
    table.to_csv(root / ".truth" / "truth.csv", index=False, lineterminator="\n")
    if cfg.extras:
        write_extras(root / "extras", cfg)
    pos = table.assign(pos=table.label == "pneumonia").groupby("site").pos
    sites = {s: {**asdict(SITES[s]), "prevalence": round(float(pos.mean().get(s, 0.0)), 4),
                 "images": int(pos.size().get(s, 0)), "configured_prevalence": SITES[s].prevalence}
             for s in cfg.sites}
    info = {"generator": _GENERATOR_NAME, "version": GENERATOR_VERSION, "fingerprint": cfg.fingerprint(),
            "params": asdict(cfg), "images": len(table), "patients": int(table.patient_id.nunique()),
            "sites": sites, "layout": "dicom/<site>/<patient_id>/study-<k>.dcm; labels.csv: path,label"}
    (root / "generation.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_case(root: Path, row: Any, cfg: SampleDataConfig) -> dict[str, Any]:
    """Render one radiograph, write it as DICOM, return its ground-truth row."""
    site = SITES[row.site]
    rng = np.random.default_rng([cfg.seed, 2, row.index])
    x, y = patient_grid(cfg.size, rng, row.sex)
    att, lung = draw_anatomy(x, y, rng, cfg.size, row.sex, row.age)
    weak = row.site == cfg.weak_site
    truth = add_opacities(att, lung, rng, cfg.size, row.label, cfg.opacity_contrast,
                          cfg.weak_contrast if weak else 1.0)
    img = acquire(att, site, rng, cfg.size, cfg.weak_noise if weak else 1.0)
    letter = "R" if row.corner in ("tl", "bl") else "L"  # patient's right is on the image left
    burn_marker(img, row.corner, letter)
    pid = f"DEMO-P{row.patient:04d}"
    rel = f"dicom/{row.site}/{pid}/study-{row.study}.dcm"
    write_dicom(root / rel, to_stored(img, site), row, site, cfg)
    return {"path": rel, "label": "pneumonia" if row.label else "normal", "site": row.site, "patient_id": pid,
            "study": row.study, "sex": row.sex, "age": row.age, "view": row.view, "marker_corner": row.corner,
            "marker_letter": letter, **truth}
