"""Binary metrics: a hand-checked fixture, agreement with scikit-learn, NaN where undefined."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from medtransfer.stats.metrics import (
    PROPORTION_METRICS,
    binary_metrics,
    fast_auroc,
    macro_auroc,
    proportion_masks,
)

# 8 rows, threshold 0.5. Predictions: [0, 0, 0, 1 | 1, 0, 1, 1]
Y8 = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P8 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.9, 0.6])


def test_hand_checked_fixture():
    m = binary_metrics(Y8, P8, 0.5)
    # by hand: TP = rows 4, 6, 7; FN = row 5; FP = row 3; TN = rows 0, 1, 2
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert (m["n"], m["n_pos"], m["prevalence"]) == (8, 4, 0.5)
    for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy"):
        assert m[key] == pytest.approx(0.75), key  # 3/4, 3/4, 3/4, 3/4, 6/8, 6/8
    # positive-negative pairs ranked correctly: 0.7 beats 3, 0.3 beats 1, 0.9 beats 4, 0.6 beats 3 -> 11/16
    assert m["auroc"] == pytest.approx(11 / 16)
    # AP: precision at each positive, descending: 1/1, 2/3, 3/4, 4/7 -> mean = 251/336
    assert m["auprc"] == pytest.approx(251 / 336)


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.round(np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1), 2)  # rounded: plenty of ties
    m = binary_metrics(y, p, 0.45)
    pred = (p >= 0.45).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["npv"] == pytest.approx(tn / (tn + fn))


def test_undefined_values_are_nan_not_zero_or_one():
    only_neg = binary_metrics(np.zeros(5), np.array([0.1, 0.2, 0.6, 0.3, 0.9]), 0.5)
    for key in ("auroc", "auprc", "sensitivity"):
        assert np.isnan(only_neg[key]), key
    assert only_neg["specificity"] == pytest.approx(3 / 5)
    none_predicted = binary_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), 0.9)
    assert np.isnan(none_predicted["ppv"])
    assert none_predicted["sensitivity"] == 0.0 and none_predicted["auroc"] == 0.75
    neither = binary_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.9)
    assert np.isnan(neither["f1"]) and neither["accuracy"] == 1.0


def test_nan_labels_are_dropped():
    y = np.array([0, np.nan, 1, 1, np.nan, 0])
    p = np.array([0.2, 0.99, 0.8, 0.4, 0.01, 0.6])
    m = binary_metrics(y, p, 0.5)
    assert m["n"] == 4
    assert m == binary_metrics(y[~np.isnan(y)], p[~np.isnan(y)], 0.5)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        binary_metrics(np.array([0, 2]), np.array([0.1, 0.2]), 0.5)
    with pytest.raises(ValueError, match="length"):
        binary_metrics(np.array([0, 1]), np.array([0.1]), 0.5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        binary_metrics(np.array([0, 1]), np.array([0.1, np.nan]), 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_fast_auroc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    p = rng.integers(0, 7, 500) / 6 + 0.1 * y * rng.integers(0, 2, 500)  # heavy ties
    assert fast_auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_fast_auroc_one_class_is_nan():
    assert np.isnan(fast_auroc(np.ones(4), np.array([0.1, 0.2, 0.3, 0.4])))


def test_existing_training_metric_still_works():
    assert macro_auroc(Y8, P8, "binary", 2) == pytest.approx(11 / 16)


@pytest.mark.parametrize("seed", range(3))
def test_proportion_masks_define_the_same_rates(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150).astype(float)
    p = np.round(rng.random(150), 1)  # ties at the threshold: p >= threshold is positive
    m = binary_metrics(y, p, 0.5)
    masks = proportion_masks(y, p, 0.5)
    assert set(masks) == set(PROPORTION_METRICS) == {"sensitivity", "specificity", "ppv", "npv", "accuracy"}
    for name, (success, denom) in masks.items():
        assert not (success & ~denom).any(), name  # a success is always in the denominator
        assert success.sum() / denom.sum() == pytest.approx(m[name]), name
    assert (
        int(masks["sensitivity"][1].sum()) == m["n_pos"] and int(masks["ppv"][1].sum()) == m["tp"] + m["fp"]
    )
    with pytest.raises(ValueError, match="f1"):
        proportion_masks(y, p, 0.5, ("f1",))
