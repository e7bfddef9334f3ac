"""Closed-form intervals: published worked examples, no collapse at 0 and 1, clustering, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.stats.intervals import (
    HANLEY_MCNEIL,
    WILSON_AUC_FALLBACK,
    auprc_fallback_interval,
    auroc_bound_interval,
    auroc_fallback_interval,
    clustered_wilson,
    design_effect,
    hanley_mcneil_interval,
    is_degenerate,
    newcombe_difference,
    wilson_interval,
)

Z95 = 1.959963984540054


def wilson_by_hand(x: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927) written out independently of the implementation: roots of (p̂ - p)^2 = z^2 p(1-p)/n."""
    a = 1 + z * z / n
    b = -(2 * x / n + z * z / n)
    c = (x / n) ** 2
    disc = np.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


# Newcombe (1998a) Stat Med 17:857, Table I, method 3 (score without continuity correction).
@pytest.mark.parametrize(
    ("x", "n", "lo", "hi"),
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_1998_worked_examples(x, n, lo, hi):
    assert wilson_interval(x / n, n) == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_matches_the_quadratic_roots_and_the_brief_example():
    assert wilson_interval(0 / 45, 45) == pytest.approx((0.0, 0.0787), abs=5e-5)
    for x, n in [(0, 45), (3, 45), (44, 45), (45, 45), (7, 12), (1, 1)]:
        assert wilson_interval(x / n, n) == pytest.approx(wilson_by_hand(x, n), abs=1e-12), (x, n)
    # 99% as well: z = 2.5758
    assert wilson_interval(5 / 40, 40, 0.99) == pytest.approx(
        wilson_by_hand(5, 40, 2.5758293035489), abs=1e-12
    )


@pytest.mark.parametrize("n", [1, 5, 45, 1000])
def test_zero_and_all_never_collapse(n):
    lo0, hi0 = wilson_interval(0.0, n)
    lo1, hi1 = wilson_interval(1.0, n)
    assert lo0 == 0.0 and hi0 > 0.0
    assert hi1 == 1.0 and lo1 < 1.0
    assert lo1 == pytest.approx(n / (n + Z95**2))  # the closed form at p = 1


def test_undefined_inputs_give_nan_and_bad_ci_raises():
    assert np.isnan(wilson_interval(float("nan"), 10)).all()
    assert np.isnan(wilson_interval(0.5, 0)).all()
    with pytest.raises(ValueError, match="ci must lie"):
        wilson_interval(0.5, 10, 95)
    with pytest.raises(ValueError, match="proportion"):
        wilson_interval(1.5, 10)


# Newcombe (1998b) Stat Med 17:873, Table II, method 10 (hybrid score, no continuity correction).
@pytest.mark.parametrize(
    ("a", "m", "b", "n", "lo", "hi"),
    [
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (6, 7, 2, 7, 0.0582, 0.8062),
        (5, 56, 0, 29, -0.0381, 0.1926),
        (0, 10, 0, 20, -0.1611, 0.2775),
        (0, 10, 0, 10, -0.2775, 0.2775),
        (10, 10, 0, 20, 0.6791, 1.0),
        (10, 10, 0, 10, 0.6075, 1.0),
    ],
)
def test_newcombe_matches_worked_examples(a, m, b, n, lo, hi):
    p1, p2 = a / m, b / n
    d, got_lo, got_hi = newcombe_difference(p1, wilson_interval(p1, m), p2, wilson_interval(p2, n))
    assert d == pytest.approx(p1 - p2)
    assert (got_lo, got_hi) == pytest.approx((lo, hi), abs=5e-5)


def test_two_perfect_groups_give_a_gap_interval_around_zero():
    d, lo, hi = newcombe_difference(1.0, wilson_interval(1.0, 30), 1.0, wilson_interval(1.0, 20))
    assert d == 0.0 and lo < 0 < hi
    assert hi == pytest.approx(1 - wilson_interval(1.0, 20)[0])  # the smaller group's uncertainty
    assert np.isnan(newcombe_difference(0.5, (np.nan, np.nan), 0.5, (0.4, 0.6))[1:]).all()


def test_one_row_per_patient_is_plain_wilson():
    rng = np.random.default_rng(0)
    denom = rng.random(80) < 0.6
    success = denom & (rng.random(80) < 0.7)
    plain = wilson_interval(success.sum() / denom.sum(), denom.sum())
    for codes in (None, np.arange(80), rng.permutation(80)):
        r = clustered_wilson(success, denom, codes)
        assert r.deff == 1.0 and r.n_eff == denom.sum()
        assert (r.lo, r.hi) == pytest.approx(plain, abs=1e-15)


def test_copied_images_add_no_information():
    # every patient's result copied m times: deff = (mk - 1)/(k - 1) by hand, so n_eff = mk(k - 1)/(mk - 1) ~ k
    rng = np.random.default_rng(1)
    k, m = 40, 3
    x = rng.random(k) < 0.8
    codes = np.repeat(np.arange(k), m)
    r = clustered_wilson(np.repeat(x, m), np.ones(k * m, dtype=bool), codes)
    assert r.deff == pytest.approx((m * k - 1) / (k - 1))
    assert r.n_eff == pytest.approx(m * k * (k - 1) / (m * k - 1))
    one_each = clustered_wilson(x, np.ones(k, dtype=bool))
    naive = wilson_interval(x.mean(), k * m)
    assert r.hi - r.lo > naive[1] - naive[0]  # wider than treating copies as independent
    assert r.hi - r.lo == pytest.approx(one_each.hi - one_each.lo, rel=0.05)  # ~ the one-image-each interval


def test_correlated_images_widen_the_interval():
    rng = np.random.default_rng(2)
    k = 60
    patient_ok = rng.random(k) < 0.75
    codes = np.repeat(np.arange(k), 2)
    success = np.repeat(patient_ok, 2) & (rng.random(2 * k) < 0.95)  # images of a patient mostly agree
    clustered = clustered_wilson(success, np.ones(2 * k, dtype=bool), codes)
    plain = clustered_wilson(success, np.ones(2 * k, dtype=bool))
    assert clustered.deff > 1.3
    assert clustered.hi - clustered.lo > plain.hi - plain.lo
    assert clustered.point == plain.point


def test_at_zero_and_one_the_effective_n_is_the_icc1_bound():
    # 45 positives from 30 patients (15 with two images, 15 with one), all detected
    codes = np.r_[np.repeat(np.arange(15), 2), np.arange(15, 30)]
    ones = np.ones(45, dtype=bool)
    point, n, k, n_eff = design_effect(ones, ones, codes)
    assert (point, n, k) == (1.0, 45, 30)
    assert n_eff == pytest.approx(45**2 / (15 * 4 + 15 * 1))  # Kish: 27, not 45 and not 30
    r = clustered_wilson(ones, ones, codes)
    assert r.hi == 1.0 and r.lo == pytest.approx(27 / (27 + Z95**2))
    equal = clustered_wilson(np.zeros(60, dtype=bool), np.ones(60, dtype=bool), np.repeat(np.arange(30), 2))
    assert equal.n_eff == pytest.approx(30) and equal.lo == 0.0 and equal.hi > 0  # equal sizes: patients
    single = clustered_wilson(np.array([True, False]), np.ones(2, dtype=bool), np.zeros(2, dtype=int))
    assert single.n_eff == pytest.approx(1.0)  # one patient is one observation


def test_no_denominator_is_nan_and_lengths_are_checked():
    r = clustered_wilson(np.zeros(4, dtype=bool), np.zeros(4, dtype=bool), np.arange(4))
    assert np.isnan([r.point, r.lo, r.hi]).all() and r.n == 0
    with pytest.raises(ValueError, match="one patient code per row"):
        clustered_wilson(np.ones(4, dtype=bool), np.ones(4, dtype=bool), np.arange(3))


def test_clustered_wilson_coverage_by_simulation():
    """p = 0.9, 30 patients x 2 images whose outcomes share a patient effect (beta-binomial, ICC 0.5)."""
    rng = np.random.default_rng(2024)
    k, p, icc, reps = 30, 0.9, 0.5, 1000
    a, b = p * (1 - icc) / icc, (1 - p) * (1 - icc) / icc
    codes = np.repeat(np.arange(k), 2)
    denom = np.ones(2 * k, dtype=bool)
    covered = covered_plain = 0
    for _ in range(reps):
        success = rng.random(2 * k) < rng.beta(a, b, k)[codes]
        r = clustered_wilson(success, denom, codes)
        covered += r.lo <= p <= r.hi
        lo, hi = wilson_interval(success.mean(), 2 * k)
        covered_plain += lo <= p <= hi
    assert covered / reps >= 0.92
    assert covered_plain < covered  # ignoring the clustering under-covers (~0.90 here)


def test_hanley_mcneil_by_hand():
    # A = 0.8, 10 + 10: Q1 = 2/3, Q2 = 32/45; var = (0.16 + 9(2/3 - 0.64) + 9(32/45 - 0.64)) / 100 = 0.0104
    half = Z95 * np.sqrt(0.0104)
    assert hanley_mcneil_interval(0.8, 10, 10) == pytest.approx((0.8 - half, 0.8 + half))
    assert hanley_mcneil_interval(1.0, 10, 10) == (1.0, 1.0)  # collapses: why there is a fallback
    assert auroc_fallback_interval(0.8, 10, 10)[2] == HANLEY_MCNEIL


def test_perfect_auroc_fallback_is_open_below_one():
    lo, hi, method = auroc_fallback_interval(1.0, 45, 200)
    assert method == WILSON_AUC_FALLBACK and hi == 1.0
    assert lo == pytest.approx(45 / (45 + Z95**2))  # Wilson at 1 with n = min(n_pos, n_neg)
    assert auroc_bound_interval(0.0, 12, 30) == pytest.approx((0.0, Z95**2 / (12 + Z95**2)))
    assert np.isnan(auroc_bound_interval(1.0, 0, 30)).all()
    lo, hi, _ = auprc_fallback_interval(1.0, 20)
    assert hi == 1.0 and lo == pytest.approx(20 / (20 + Z95**2))


def test_degenerate_detection():
    assert is_degenerate(1.0, 1.0, 1.0) and is_degenerate(0.0, 0.0, 0.1)
    assert is_degenerate(0.8, 0.8, 0.8) and is_degenerate(0.8, np.nan, np.nan)
    assert not is_degenerate(0.8, 0.7, 0.9) and not is_degenerate(np.nan, np.nan, np.nan)
