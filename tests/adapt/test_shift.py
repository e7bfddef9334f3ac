"""The shift check (``medtransfer.adapt.shift``) on a tiny trained linear probe (48 px DICOM).

Sites are new patients drawn from the training generator; a shifted site has some of them degraded
(downsampled then upsampled, or noise). Intensity rescaling alone is not a shift the model sees: the input
pipeline windows each image, so a linear contrast change reaches the model unchanged and is rightly not flagged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medtransfer as mt
from medtransfer.adapt.shift import ALPHA, ShiftReport, _mmd2, check_shift
from medtransfer.errors import ConfigError, ManifestError
from medtransfer.run_dir import Run
from tests.factories import chest_like, write_dicom
from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset

SIZE = 48
PROBE = [*TINY_OVERRIDES, "train.strategy=linear-probe", "train.epochs=15", "train.lr=0.01", "train.patience=15"]
N_PERM = 300


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``blur``: 4x block-average down, nearest up (a low-resolution scanner); ``noise``: Gaussian noise."""
    if kind == "blur":
        small = img.reshape(SIZE // 4, 4, SIZE // 4, 4).mean(axis=(1, 3))
        return np.kron(small, np.ones((4, 4)))
    if kind == "noise":
        return img + 300 * rng.standard_normal(img.shape)
    raise ValueError(kind)


def write_site(root: Path, seed: int, *, n: int = 40, kind: str | None = None, degraded: int = 0,
               class_folders: bool = False) -> Path:
    """``n`` new patients like the training data (half with an opacity); the last ``degraded`` are degraded."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i in range(n):
        img = chest_like(SIZE, seed=int(rng.integers(1 << 30))).astype(np.float64)
        label = "pneumonia" if i % 2 else "normal"
        if label == "pneumonia":
            cx, cy = rng.uniform(0.28, 0.4), rng.uniform(0.35, 0.55)
            img += 1800 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.06**2)))
        bad = kind is not None and i >= n - degraded
        if bad:
            img = degrade(img, kind, rng)
        name = f"{'bad' if bad else 'ok'}_{i:03d}.dcm"
        write_dicom(root / (label if class_folders else "") / name, np.clip(img, 0, 4095).astype(np.uint16),
                    patient_id=f"SITE{seed}-{i:03d}")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("shift")
    make_tiny_dataset(root / "data", n_per_class=30)
    mt.train(root / "data", overrides=PROBE, out=root / "run")
    return mt.load_run(root / "run")


def test_held_out_same_distribution_is_not_flagged_over_seeds(run: Run, tmp_path: Path) -> None:
    reports = []
    for seed in range(5):
        site = mt.index_scans(write_site(tmp_path / f"s{seed}", 100 + seed), require_labels=False)
        assert site.task == "unlabelled"  # a folder without labels is a normal input
        reports.append(check_shift(run, site, n_perm=N_PERM, seed=seed))
    assert [r.shift for r in reports] == [False] * 5, [r.verdict for r in reports]
    for r in reports:
        assert r.p_value >= ALPHA and r.mmd_p_value > 0.05
        assert r.domain_auroc_ci[0] < 0.5 < r.domain_auroc_ci[1] + 0.05  # indistinguishable
        assert r.verdict.startswith("no shift detected (") and "\n" not in r.verdict
        # val has 16 cases (< 30): the reference is val+test, all of them, no subsampling at this size
        assert r.method["reference"] == ["val", "test"] and r.method["n_reference"] == 30
        assert r.method["n_site"] == 40 and not r.method["subsampled"]


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_constructed_shift_is_flagged_and_the_degraded_cases_are_the_unlike_ones(run: Run, tmp_path: Path,
                                                                                  kind: str) -> None:
    whole = check_shift(run, mt.index_scans(write_site(tmp_path / "all", 7, kind=kind, degraded=40),
                                            require_labels=False), n_perm=N_PERM)
    assert whole.shift and whole.p_value < ALPHA, whole.verdict
    assert whole.domain_auroc_ci[0] > 0.5, whole.domain_auroc_ci
    assert whole.verdict.startswith("shift: ") and "\n" not in whole.verdict
    # half the site degraded: still flagged, and the cases most unlike training are the degraded ones
    site = mt.index_scans(write_site(tmp_path / "half", 8, kind=kind, degraded=20), require_labels=False)
    r = check_shift(run, site, n_perm=N_PERM)
    assert r.shift and r.p_value < ALPHA, r.verdict
    names = dict(zip(site.df["case_id"].astype(str), site.df["path"].astype(str), strict=True))
    assert len(r.unlike) == 10
    assert sum(names[c].startswith("bad_") for c in r.unlike) >= 8, [names[c] for c in r.unlike]
    # the input side sees it too: the model-input intensities moved, and sizes/tags are tabulated
    ch = whole.input["intensity"][0]
    assert ch["ks"] > 0.02 and len(ch["hist_site"]) == len(ch["edges"]) - 1
    assert whole.input["sizes"]["rows"]["site"]["median"] == SIZE
    assert whole.input["tags"]["modality"]["site"] == {"CR": 1.0}
    out = whole.output["classes"][0]
    assert out["class"] == "pneumonia"
    assert out["positive_rate_site_lo"] <= out["positive_rate_site"] <= out["positive_rate_site_hi"]


def test_a_labelled_site_with_other_classes_works_and_the_report_round_trips(run: Run, tmp_path: Path) -> None:
    folder = write_site(tmp_path / "labelled", 11, n=30, kind="noise", degraded=30, class_folders=True)
    for label in ("normal", "pneumonia"):  # classes the run has never heard of: labels are not read here
        (folder / label).rename(folder / f"other_{label}")
    site = mt.index_scans(folder)
    assert site.task == "binary" and site.classes == ["other_normal", "other_pneumonia"]
    r = check_shift(run, site, n_perm=N_PERM)
    assert r.shift
    data = json.loads(json.dumps(r.to_json(), allow_nan=False))  # plain JSON types only
    assert {"shift", "p_value", "domain_auroc", "domain_auroc_ci", "mmd", "mmd_p_value", "input", "output",
            "verdict", "unlike", "method"} <= set(data)
    assert isinstance(data["shift"], bool) and isinstance(data["p_value"], float)
    back = ShiftReport.from_json(data)
    assert back.to_json() == data and back.domain_auroc_ci == pytest.approx(r.domain_auroc_ci)


def test_refusals(run: Run, tmp_path: Path) -> None:
    site = mt.index_scans(write_site(tmp_path / "few", 3, n=12), require_labels=False)
    with pytest.raises(ConfigError, match="n_perm"):
        check_shift(run, site, n_perm=50)
    with pytest.raises(ManifestError, match="choose from"):
        check_shift(run, site, reference="holdout")
    tiny = mt.index_scans(write_site(tmp_path / "tiny", 4, n=5), require_labels=False)
    with pytest.raises(ManifestError, match="at least 10"):
        check_shift(run, tiny)


def test_batched_mmd_equals_the_textbook_unbiased_estimate() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((23, 3))
    k = np.exp(-((z[:, None] - z[None]) ** 2).sum(-1) / 2.0)
    a = np.zeros((23, 2), dtype=bool)
    a[15:, 0] = True
    a[rng.permutation(23)[:9], 1] = True
    for j in range(2):
        x, y = np.flatnonzero(~a[:, j]), np.flatnonzero(a[:, j])
        kxx, kyy, kxy = k[np.ix_(x, x)], k[np.ix_(y, y)], k[np.ix_(x, y)]
        want = ((kxx.sum() - np.trace(kxx)) / (len(x) * (len(x) - 1))
                + (kyy.sum() - np.trace(kyy)) / (len(y) * (len(y) - 1)) - 2 * kxy.mean())
        assert _mmd2(k, a)[j] == pytest.approx(want, rel=1e-10)
