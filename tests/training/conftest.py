"""A tiny, learnable labelled DICOM folder for training tests (real files, 48 px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.factories import chest_like, write_dicom

SIZE = 48


def make_tiny_dataset(root: Path, *, n_per_class: int = 20, seed: int = 0, size: int = SIZE) -> Path:
    """Class sub-folders normal/ and pneumonia/; pneumonia images carry a bright soft opacity in a lung."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for label in ("normal", "pneumonia"):
        for i in range(n_per_class):
            img = chest_like(size, seed=int(rng.integers(1 << 30))).astype(np.float64)
            if label == "pneumonia":
                cx, cy = rng.uniform(0.28, 0.4), rng.uniform(0.35, 0.55)
                blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.06**2)))
                img += 1800 * blob
            img = np.clip(img, 0, 4095).astype(np.uint16)
            write_dicom(root / label / f"{label}_{i:03d}.dcm", img, patient_id=f"P{label[0]}{i:03d}",
                        sex="F" if i % 2 else "M", age=f"{20 + 3 * i:03d}Y")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 labelled 48 px DICOMs (20 per class), one per patient."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


TINY_OVERRIDES = [
    "input.size=[48, 48]",
    "train.batch_size=8",
    "train.epochs=3",
    "train.freeze_epochs=1",
    "train.num_workers=0",
    "train.augment.enabled=false",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
]
