"""Calibration: ECE, Brier, reliability curve, temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, log_softmax, logit, softmax
from sklearn.metrics import brier_score_loss

from medtransfer.models.outputs import apply_temperature
from medtransfer.stats.calibration import (
    brier,
    ece,
    fit_temperature,
    reliability_curve,
)


def calibrated(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    return (rng.random(n) < p).astype(float), p


def binary_nll(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.mark.parametrize("adaptive", [False, True])
def test_ece_small_when_calibrated_large_when_overconfident(adaptive):
    y, p = calibrated()
    assert ece(y, p, adaptive=adaptive) < 0.02
    overconfident = expit(3 * logit(p))
    assert ece(y, overconfident, adaptive=adaptive) > 0.1


def test_adaptive_bins_see_what_equal_width_bins_average_away():
    # all mass in [0, 0.1): 50 cases at 0.02 with 4 positives (8%), 50 at 0.08 with 1 positive (2%)
    p = np.r_[np.full(50, 0.02), np.full(50, 0.08)]
    y = np.r_[np.ones(4), np.zeros(46), np.ones(1), np.zeros(49)]
    assert ece(y, p) == pytest.approx(0.0, abs=1e-12)  # one bin: mean p 0.05 vs 5% positive
    assert ece(y, p, n_bins=2, adaptive=True) == pytest.approx(0.06)  # |0.02-0.08| and |0.08-0.02|


def test_ece_hand_checked():
    # bin [0.2,0.3): p 0.25, 0.25, y 0, 1 -> |0.25-0.5| = 0.25; bin [0.9,1]: p 1.0, y 1 -> 0. Weighted: 2/3*0.25
    assert ece(np.array([0, 1, 1]), np.array([0.25, 0.25, 1.0])) == pytest.approx(1 / 6)


def test_brier_equals_sklearn():
    y, p = calibrated(500, seed=3)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p))


def test_reliability_curve_shape():
    y, p = calibrated(1000)
    curve = reliability_curve(y, p, n_bins=5)
    assert list(curve.columns) == ["bin_lower", "bin_upper", "mean_predicted", "fraction_positive", "count"]
    assert len(curve) == 5 and curve["count"].sum() == 1000
    assert curve["bin_lower"].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert (
        (curve["mean_predicted"] >= curve["bin_lower"]) & (curve["mean_predicted"] <= curve["bin_upper"])
    ).all()
    empty = reliability_curve(np.array([0, 1]), np.array([0.05, 0.95]))
    assert empty["count"].tolist()[1] == 0 and np.isnan(empty["mean_predicted"][1])


def test_probabilities_required():
    with pytest.raises(ValueError, match="logits"):
        ece(np.array([0, 1]), np.array([-2.0, 3.0]))


def test_temperature_recovers_overconfidence_binary():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(z.size) < expit(z)).astype(float)
    t = fit_temperature(3 * z, y, "binary")
    assert t == pytest.approx(3.0, rel=0.1)
    assert binary_nll(y, apply_temperature(3 * z, t, "binary")) < binary_nll(y, expit(3 * z))
    assert fit_temperature((3 * z)[:, None], y, "binary") == pytest.approx(t)  # (N, 1) logits too
    assert apply_temperature((3 * z)[:, None], t, "binary").shape == (z.size,)


def test_temperature_multiclass():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (5000, 4))
    cum = softmax(z, axis=1).cumsum(axis=1)
    targets = (rng.random((5000, 1)) > cum).sum(axis=1)
    t = fit_temperature(3 * z, targets, "multiclass")
    assert t == pytest.approx(3.0, rel=0.1)
    probs = apply_temperature(3 * z, t, "multiclass")
    assert probs.sum(axis=1) == pytest.approx(np.ones(5000))
    nll = -np.log(probs[np.arange(5000), targets]).mean()
    assert nll < -log_softmax(3 * z, axis=1)[np.arange(5000), targets].mean()


def test_temperature_multilabel_masks_unknown():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, (6000, 3))
    y = (rng.random(z.shape) < expit(z)).astype(float)
    unknown = rng.random(z.shape) < 0.3
    y[unknown] = np.nan
    logits = 0.5 * z
    logits[unknown] = 50.0  # garbage where unknown: would wreck the fit if not masked
    assert fit_temperature(logits, y, "multilabel") == pytest.approx(0.5, rel=0.1)


def test_temperature_one_class_returns_one_with_warning():
    with pytest.warns(UserWarning, match="T = 1.0"):
        assert fit_temperature(np.array([0.3, 2.0, -1.0]), np.ones(3), "binary") == 1.0
    with pytest.warns(UserWarning, match="T = 1.0"):
        assert fit_temperature(np.zeros((3, 2)), np.zeros(3), "multiclass") == 1.0


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="task"):
        fit_temperature(np.zeros(2), np.array([0, 1]), "regression")
