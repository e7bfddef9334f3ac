"""The saved model is the best-validation checkpoint, not the last epoch's weights (issue 14, item 6).

Each scenario trains a tiny run whose validation AUROC peaks before the last epoch, by construction:

- ``linear-probe-overfits``: a quarter of the labels are flipped (train and val alike) and the head trains
  at a constant LR for more epochs than it needs, so it memorises the flipped training labels and gets worse
  on validation after its peak.
- ``gradual-unfreezes-too-fast``: the head is fitted on frozen features, then the whole network trains at the
  head's LR with no layer-wise decay and BatchNorm statistics updating: too much for pretrained weights, so
  validation AUROC collapses after unfreezing. The best weights (and BatchNorm buffers) come from the frozen
  phase, so restoring them must cross a phase boundary.

The test reloads ``model.safetensors`` with the public API and recomputes the validation AUROC from the run's
own predictions, twice (``mt.evaluate(run_dir, split="val")`` and ``load_run(run_dir).predict(files)``); both
must equal the best ``val_auroc`` in ``history.csv``. It first checks that the last epoch scored at least one
case pair worse than the best, so a trainer that saved the last weights could not pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import medtransfer as mt
from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset

N_PER_CLASS = 30
#: Per class: the first 14 cases train, the next 12 validate (24 val cases: AUROC moves in steps of 1/144).
TRAIN, VAL = 14, 12
#: Every FLIP-th case of each class carries the other class's label.
FLIP = 4
SCENARIOS = {
    "linear-probe-overfits": ["train.strategy=linear-probe", "train.epochs=8", "train.lr=0.01", "train.patience=8"],
    "gradual-unfreezes-too-fast": ["train.strategy=gradual", "train.epochs=3", "train.freeze_epochs=2",
                                   "train.lr=0.01", "train.unfreeze_lr_factor=1", "train.lr_decay=1",
                                   "train.bn=train", "train.patience=3"],
}
#: AUROC is a mean over (positive, negative) pairs; the training loop and the evaluation compute the same
#: logits in different batches (and, for the linear probe, from cached features), which changes them by
#: float rounding (~1e-7 relative) only. Reordering two cases would move the AUROC by a whole pair (1/144),
#: so the tolerance only absorbs the rounding of the sum.
TOL = 1e-6


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """60 DICOMs (48 px), a labels CSV with fixed splits and a quarter of the labels flipped, and the overrides
    every run here shares (the tiny config, a constant LR, one decoded-image and feature cache for all runs)."""
    root = tmp_path_factory.mktemp("best-ckpt")
    data = make_tiny_dataset(root / "data", n_per_class=N_PER_CLASS)
    rows = []
    for label, other in (("normal", "pneumonia"), ("pneumonia", "normal")):
        for i in range(N_PER_CLASS):
            split = "train" if i < TRAIN else "val" if i < TRAIN + VAL else "test"
            rows.append({"path": f"{label}/{label}_{i:03d}.dcm", "label": other if i % FLIP == FLIP - 1 else label,
                         "split": split})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return data, labels, [*TINY_OVERRIDES, "train.scheduler=none", f"data.cache_dir={root / 'cache'}"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_saved_model_is_the_best_validation_checkpoint(noisy_data: tuple[Path, Path, list[str]], tmp_path: Path,
                                                       scenario: str) -> None:
    data, labels, common = noisy_data
    run_dir = tmp_path / "run"
    mt.train(data, labels=labels, overrides=[*common, *SCENARIOS[scenario]], out=run_dir)

    history = pd.read_csv(run_dir / "history.csv")
    best_row = history.loc[history["val_auroc"].idxmax()]  # the first epoch reaching the maximum, as the trainer
    best, best_epoch = float(best_row["val_auroc"]), int(best_row["epoch"])
    run = mt.load_run(run_dir)
    assert run.card.training["best_epoch"] == best_epoch
    assert run.card.training["best_val_auroc"] == pytest.approx(best, abs=TOL)

    # the scenario holds: the last epoch is worse than the best by at least one case pair, so saving the last
    # weights would give another validation AUROC (if this fails, the scenario needs retuning, not the trainer)
    val = run.manifest.split("val")
    files = [str(val.abspath(row)[0]) for _, row in val.df.iterrows()]
    y = (val.df["label"] == "pneumonia").to_numpy(dtype=int)
    pair = 1 / (y.sum() * (len(y) - y.sum()))
    last = float(history["val_auroc"].iloc[-1])
    assert best_epoch < len(history) and last <= best - pair + TOL, (
        f"{scenario}: validation AUROC no longer degrades after epoch {best_epoch}:\n{history}")

    # 1. the run's own evaluation of its val split (temperature scaling keeps the ranking, so the AUROC)
    result = mt.evaluate(run_dir, split="val", n_boot=0, out_dir=tmp_path / "eval-val")
    preds = result.predictions
    assert sorted(preds["case_id"]) == sorted(val.df["case_id"])
    from_csv = roc_auc_score(preds["true_pneumonia"], preds["p_pneumonia"])
    assert float(result.overall.set_index("class").loc["pneumonia", "auroc"]) == pytest.approx(from_csv, abs=1e-12)
    # the training loop scores validation with float32 sigmoids, which tie near 0 and 1 (see the xfail below)
    as_float32 = roc_auc_score(preds["true_pneumonia"], preds["p_raw_pneumonia"].astype(np.float32))
    assert from_csv == pytest.approx(best, abs=TOL), (
        f"{scenario}: the saved model's val AUROC {from_csv:.6f} is not the best epoch's ({best:.6f}, epoch "
        f"{best_epoch}); the last epoch had {last:.6f}. From float32 probabilities it is {as_float32:.6f}: if "
        f"that is the best, saturated probabilities differ, not the weights.\n{history}")

    # 2. the reloaded model on the same scan files
    by_files = roc_auc_score(y, run.predict(files)["p_pneumonia"])
    assert by_files == pytest.approx(best, abs=TOL)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "evaluate still ranks on float64 probabilities, which saturate to 1.0 beyond |logit| ~37, so an "
    "over-confident model's evaluated AUROC differs from its ranking; training's val_auroc now ranks on logits "
    "(models.outputs.ranking_scores). Remove this marker when predictions carry logits for ranking metrics."))
def test_auroc_of_an_overconfident_model_does_not_depend_on_float_precision(
        noisy_data: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    data, labels, common = noisy_data
    run_dir = tmp_path / "run"
    mt.train(data, labels=labels, overrides=[*common, "train.strategy=linear-probe", "train.epochs=3", "train.lr=1",
                                             "train.patience=3"], out=run_dir)
    run = mt.load_run(run_dir)
    val = run.manifest.split("val")
    ds = mt.ScanDataset(val, run.card.input, train=False)
    with torch.no_grad():
        logits = run.model(torch.stack([ds[i]["image"] for i in range(len(ds))])).numpy().reshape(-1)
    if np.abs(logits).max() < 40:  # not an AssertionError: the xfail expects only those
        pytest.fail(f"the scenario needs logits beyond float64's sigmoid range (max |logit| {np.abs(logits).max()})")
    y = (val.df["label"] == "pneumonia").to_numpy(dtype=int)
    ranking = roc_auc_score(y, logits)  # the model's true ranking AUROC
    history = pd.read_csv(run_dir / "history.csv")
    evaluated = mt.evaluate(run_dir, split="val", n_boot=0, out_dir=tmp_path / "eval-val").overall
    assert float(history["val_auroc"].iloc[int(run.card.training["best_epoch"]) - 1]) == pytest.approx(ranking)
    assert float(evaluated.set_index("class").loc["pneumonia", "auroc"]) == pytest.approx(ranking)
