"""Pretrained beats scratch on the same small dataset and the same budget."""

from __future__ import annotations

import pytest

import medtransfer as mt

pytestmark = pytest.mark.slow

BUDGET = [
    "train.strategy=fine-tune",
    "train.epochs=4",
    "train.patience=4",
    "train.batch_size=16",
    "train.lr=0.0005",
    "train.augment.enabled=false",
]


def _best_val(data, labels, out, weights: str, size: int, extra: list[str]) -> float:
    run = mt.train(data, labels=labels, out=out,
                   overrides=[*BUDGET, f"model.weights={weights}", f"input.size=[{size}, {size}]", *extra])
    return float(run.history["val_auroc"].max())


def test_pretrained_beats_scratch_on_real_chest_xrays(kermany_dir, tmp_path) -> None:
    """Real paediatric chest X-rays (../shared/data/kermany-cxr-600), 96 px, same budget for both."""
    import pandas as pd

    labels = pd.read_csv(f"{kermany_dir}/labels.csv")
    # 160 patients, balanced: small data is where transfer should matter
    sub = pd.concat([g.head(80) for _, g in labels.groupby("label")])
    csv = tmp_path / "labels.csv"
    sub.to_csv(csv, index=False)
    extra = ["data.verify_pixels=false"]
    pre = _best_val(kermany_dir, csv, tmp_path / "pre", "imagenet", 96, extra)
    scratch = _best_val(kermany_dir, csv, tmp_path / "scratch", "none", 96, extra)
    print(f"val AUROC pretrained {pre:.3f} vs scratch {scratch:.3f}")
    assert pre > scratch
    assert pre > 0.85
