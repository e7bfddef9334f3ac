"""Acceptance on a trained run: a corner-marker shortcut is found, sanity check passes, explain_run caches.

One run is trained for the module (efficientnet_lite0, linear probe, 128 px DICOMs): the label is carried
ONLY by a bright square in the top-left corner; the background is a random body-like image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medtransfer as mt
from medtransfer.data.dataset import ScanDataset
from medtransfer.explain.regions import region_hint
from medtransfer.explain.run import INDEX_COLUMNS, explain_run
from medtransfer.explain.saliency import explain
from medtransfer.explain.sanity import sanity_check
from medtransfer.explain.selection import select_cases
from tests.factories import CANARIES, chest_like, write_dicom
from tests.training.conftest import TINY_OVERRIDES

SIZE = 128

# ---------------------------------------------------------------------------------------------- selection

PREDICTIONS = pd.DataFrame({  # the predictions.csv format; c8 could not be decoded (no score)
    "case_id": [f"c{i}" for i in range(9)],
    "split": ["test"] * 9,
    "true_pneu": [1, 1, 1, 0, 0, 0, 1, 0, 1],
    "p_pneu": [0.95, 0.70, 0.10, 0.90, 0.20, 0.60, 0.40, 0.05, np.nan],
    "p_raw_pneu": [0.99, 0.80, 0.05, 0.95, 0.10, 0.70, 0.30, 0.01, np.nan],
    "pred_pneu": pd.array([1, 1, 0, 1, 0, 1, 0, 0, pd.NA], dtype="Int64"),
    "sex": ["F", "M", "F", "M", "F", "F", "M", "M", "F"],
})


def test_selection_picks_most_confident_tp_fp_and_worst_fn() -> None:
    sel = select_cases(PREDICTIONS, n=1)
    got = {(r.kind, r.case_id) for r in sel.itertuples()}
    assert got == {("TP", "c0"), ("FP", "c3"), ("FN", "c2")}
    assert set(sel["class"]) == {"pneu"} and set(sel["group"]) == {"all"}
    two = select_cases(PREDICTIONS, n=2)
    assert list(two.loc[two["kind"] == "FP", "case_id"]) == ["c3", "c5"]
    assert list(two.loc[two["kind"] == "FN", "case_id"]) == ["c2", "c6"]  # lowest p first
    assert "c8" not in set(select_cases(PREDICTIONS, n=10)["case_id"])


def test_selection_per_subgroup_and_multiclass_columns() -> None:
    sel = select_cases(PREDICTIONS, n=1, group_by="sex")
    assert set(zip(sel["group"], sel["kind"], sel["case_id"], strict=True)) == {
        ("sex=F", "TP", "c0"), ("sex=F", "FP", "c5"), ("sex=F", "FN", "c2"),
        ("sex=M", "TP", "c1"), ("sex=M", "FP", "c3"), ("sex=M", "FN", "c6")}
    multi = PREDICTIONS.assign(true_normal=1 - PREDICTIONS["true_pneu"], p_normal=1 - PREDICTIONS["p_pneu"],
                               pred_normal=1 - PREDICTIONS["pred_pneu"])
    sel = select_cases(multi, n=1)
    assert set(sel["class"]) == {"pneu", "normal"}
    assert sel[(sel["class"] == "normal") & (sel["kind"] == "TP")]["case_id"].tolist() == ["c7"]
    with pytest.raises(ValueError, match="subgroup"):
        select_cases(PREDICTIONS, group_by="site")


# ------------------------------------------------------------------------------------ trained run (slow)


def make_corner_dataset(root: Path, *, n_per_class: int = 20, size: int = SIZE, seed: int = 0) -> Path:
    """Class folders normal/ and marked/; marked images have a saturated square (10% side) top-left."""
    rng = np.random.default_rng(seed)
    side, off = round(size * 0.1), max(1, round(size * 0.02))
    for label in ("normal", "marked"):
        for i in range(n_per_class):
            img = chest_like(size, seed=int(rng.integers(1 << 30))).astype(np.float64) * rng.uniform(0.8, 1.1)
            if label == "marked":
                img[off:off + side, off:off + side] = 4095
            write_dicom(root / label / f"{label}_{i:03d}.dcm", np.clip(img, 0, 4095).astype(np.uint16),
                        patient_id=f"P{label[0]}{i:03d}", window=(2048, 4096))
    return root


@pytest.fixture(scope="module")
def corner_run(tmp_path_factory: pytest.TempPathFactory) -> mt.training.run.Run:
    root = tmp_path_factory.mktemp("corner")
    data = make_corner_dataset(root / "data")
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("input.size", "train.epochs"))]
    overrides += [f"input.size=[{SIZE}, {SIZE}]", "train.epochs=8", "train.strategy=linear-probe"]
    run = mt.train(data, overrides=overrides, out=root / "run")
    assert run.history["val_auroc"].max() >= 0.99, run.history
    return run


def _test_images(run: mt.training.run.Run) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    m = run.manifest.split("test")
    ds = ScanDataset(m, run.card.input)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    img01 = np.stack([ds.cached_image(i) for i in range(len(ds))])
    return x, img01, (m.df["label"] == "marked").to_numpy().copy()


@pytest.mark.slow
def test_gradcam_finds_the_corner_marker(corner_run) -> None:
    x, img01, marked = _test_images(corner_run)
    sm = explain(corner_run, x[marked], method="gradcam")
    hints = region_hint(sm.maps, img01[marked])
    assert (hints["corner"] == "top_left").all(), hints
    uniform_share = hints["corner_mass"] / hints["corner_enrichment"]
    assert (hints["corner_mass"] > 2 * uniform_share).all(), hints
    assert hints["hint"].str.contains("corner:top_left").mean() >= 0.8, hints


@pytest.mark.slow
def test_cascading_randomisation_changes_gradcam(corner_run) -> None:
    x, _, marked = _test_images(corner_run)
    result = sanity_check(corner_run, x[marked][:4], method="gradcam")
    assert result.mean_spearman < 0.5 and result.passed, result.table
    assert list(result.table["randomised"])[:2] == ["head", "stage3"]


@pytest.mark.slow
def test_explain_run_writes_index_and_pngs_then_caches(corner_run) -> None:
    run_dir = corner_run.path
    index_path = explain_run(run_dir, method="gradcam", cases=2)
    index = pd.read_csv(index_path, dtype={"case_id": str})
    assert list(index.columns) == INDEX_COLUMNS
    assert len(index) >= 2 and set(index["kind"]) <= {"TP", "FP", "FN"}
    assert (index["method"] == "gradcam").all() and index["sanity_passed"].all()
    assert (run_dir / "saliency" / "sanity_gradcam.csv").is_file()
    for rel in index["file"]:
        png = run_dir / "saliency" / rel
        with Image.open(png) as im:
            im.load()
            text = " ".join(f"{k}={v}" for k, v in im.info.items())
        assert not any(c in text for c in CANARIES) and str(run_dir) not in text
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "saliency").rglob("*") if p.is_file()}
    assert explain_run(run_dir, method="gradcam", cases=2) == index_path
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "saliency").rglob("*") if p.is_file()} == stamps
    # asking for one more case by id does only that case
    extra = next(c for c in corner_run.manifest.split("test").df["case_id"] if c not in set(index["case_id"]))
    explain_run(run_dir, method="gradcam", case_ids=[extra])
    after = pd.read_csv(index_path, dtype={"case_id": str})
    assert len(after) == len(index) + 1 and extra in set(after["case_id"])
    for p, t in stamps.items():
        if p.suffix == ".png":
            assert p.stat().st_mtime_ns == t, p


@pytest.mark.slow
def test_explain_a_split_uses_that_splits_evaluation(corner_run, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(corner_run.path, run_dir, ignore=shutil.ignore_patterns("saliency"))
    mt.evaluate(run_dir, n_boot=0)  # -> run/predictions.csv: test cases only
    mt.evaluate(run_dir, split="val", n_boot=0)  # -> run/split-val/predictions.csv
    val_ids = set(pd.read_csv(run_dir / "split-val" / "predictions.csv", dtype={"case_id": str})["case_id"])
    index = pd.read_csv(explain_run(run_dir, method="gradcam", cases=1, split="val"), dtype={"case_id": str})
    assert len(index) >= 1 and set(index["case_id"]) <= val_ids


@pytest.mark.slow
def test_occlusion_run_finds_the_marker_at_a_fixed_cost_per_case(corner_run, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """explain_run's occlusion work is bounded: the sanity check on at most SANITY_IMAGES images (coarse pass,
    2 + 64 images per map, for the trained model and each cascade step), then per case at most 2 + 64 + 64
    occluded images and the 4 x 17 images of its deletion curves; and the maps still find the marker."""
    import shutil

    from medtransfer.explain.run import SANITY_IMAGES
    from medtransfer.models.classifier import Classifier

    run_dir = tmp_path / "run"
    shutil.copytree(corner_run.path, run_dir, ignore=shutil.ignore_patterns("saliency"))
    preds = corner_run.predict(corner_run.manifest.split("test"))
    seen = {"images": 0}
    forward = Classifier.forward

    def counting(self: Classifier, x: torch.Tensor) -> torch.Tensor:
        seen["images"] += len(x)
        return forward(self, x)

    monkeypatch.setattr(Classifier, "forward", counting)
    path = explain_run(run_dir, method="occlusion", cases=2, predictions=preds)
    index = pd.read_csv(path, dtype={"case_id": str})
    n_cases, n_sanity, steps = len(index), min(SANITY_IMAGES, len(index)), len(corner_run.model.stages())
    bound = n_sanity * (1 + steps) * (2 + 64) + n_cases * (2 + 64 + 64 + 4 * 17)
    assert n_cases and 0 < seen["images"] <= bound, (seen["images"], bound, n_cases)
    sanity = pd.read_csv(run_dir / "saliency" / "sanity_occlusion.csv")
    assert sanity["maps"].str.contains("coarse pass").all() and len(sanity) == steps
    df = corner_run.manifest.df
    labels = dict(zip(df["case_id"].astype(str), df["label"], strict=True))
    marked = index[index["case_id"].map(labels) == "marked"]
    assert len(marked) and (marked["corner"] == "top_left").all(), index
