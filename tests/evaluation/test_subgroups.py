"""Subgroup tables and gaps: planted weakness flagged, no-effect not flagged, insufficient groups honest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame
from sklearn.metrics import recall_score, roc_auc_score

from medtransfer.errors import ConfigError
from medtransfer.evaluation import subgroups
from medtransfer.evaluation.subgroups import subgroup_gaps, subgroup_table
from medtransfer.stats.intervals import clustered_wilson, newcombe_difference

KW = {"y_col": "y", "p_col": "p", "threshold": 0.5}


def make_df(seed: int = 0, n_patients: int = 500, noise: dict[str, float] | None = None) -> pd.DataFrame:
    """Patients with 1-2 images; score = y + group-specific noise (sigma 0.55 -> AUROC ~0.9; 1.84 -> ~0.65)."""
    noise = noise or {"A": 0.55, "B": 0.55}
    rng = np.random.default_rng(seed)
    pk = np.repeat(np.arange(n_patients), rng.integers(1, 3, n_patients))
    groups = np.array(sorted(noise))[np.arange(n_patients) % len(noise)][pk]
    y = rng.integers(0, 2, n_patients)[pk].astype(float)
    sigma = np.array([noise[g] for g in groups])
    p = 1 / (1 + np.exp(-(y - 0.5 + sigma * rng.normal(size=pk.size))))
    sex = np.array(["F", "M"])[rng.integers(0, 2, n_patients)][pk]
    age = np.array(["18-39", "40-59", "60+"])[rng.integers(0, 3, n_patients)][pk]
    return pd.DataFrame({"patient_key": pk, "group": groups, "sex": sex, "age_band": age, "y": y, "p": p})


def test_planted_weakness_is_flagged():
    df = make_df(noise={"A": 0.55, "B": 1.84})
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=300).set_index("group")
    assert table.loc["A", "auroc"] > 0.85 and table.loc["B", "auroc"] < 0.72
    gaps = subgroup_gaps(df, **KW, attributes=["group"], n_boot=300).set_index("metric")
    row = gaps.loc["auroc"]
    assert row["flagged"] and row["gap_lo"] > 0
    assert (row["worst_group"], row["best_group"]) == ("B", "A")
    assert row["gap"] == pytest.approx(table.loc["A", "auroc"] - table.loc["B", "auroc"])
    assert row["gap_lo"] < row["gap"] < row["gap_hi"]


def test_equal_groups_not_flagged_in_most_seeds():
    flags = []
    for seed in range(10):
        df = make_df(seed=seed, n_patients=400, noise={"A": 0.8, "B": 0.8, "C": 0.8})
        gaps = subgroup_gaps(df, **KW, attributes=["group"], n_boot=300, seed=seed).set_index("metric")
        flags.append(gaps["flagged"].to_numpy())
        assert (gaps["gap"] >= 0).all() and (gaps["gap_lo"] < gaps["gap"]).all()
    flags = np.array(flags)
    assert flags[:, 0].sum() <= 1  # auroc
    assert flags.sum() <= 3  # all three metrics, 30 tests at nominal 5%


def test_small_group_is_insufficient_with_its_n():
    df = make_df()
    small = df["patient_key"] < 4  # 4 patients
    df.loc[small, "group"] = "tiny"
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=50).set_index("group")
    row = table.loc["tiny"]
    assert row["status"].startswith("insufficient") and "4 patients" in row["status"]
    assert row["n"] == small.sum() and row["n_patients"] == 4
    assert np.isnan(row[["auroc", "auroc_lo", "sensitivity", "specificity_hi", "ece"]].astype(float)).all()
    assert table.loc["A", "status"] == "ok"


def test_one_class_group_is_insufficient():
    df = make_df()
    df.loc[df["group"] == "B", "y"] = 1.0
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=50).set_index("group")
    assert "one class" in table.loc["B", "status"]
    assert np.isnan(table.loc["B", "auroc"]) and table.loc["B", "prevalence"] == 1.0
    gaps = subgroup_gaps(df, **KW, attributes=["group"], n_boot=50)
    assert gaps["gap"].isna().all() and not gaps["flagged"].any()
    assert gaps["reason"].str.contains("fewer than 2").all()


def test_intersections_and_unknown():
    df = make_df()
    df.loc[df["patient_key"] % 7 == 0, "sex"] = None
    table = subgroup_table(df, **KW, attributes=["sex"], intersections=[("sex", "age_band")], n_boot=50)
    assert table[table["attribute"] == "sex"]["group"].tolist() == ["F", "M", "unknown"]
    inter = table[table["attribute"] == "sex×age_band"]
    assert "F×40-59" in set(inter["group"]) and "unknown×60+" in set(inter["group"])
    assert len(inter) == 9
    expected = ((df["sex"] == "F") & (df["age_band"] == "40-59")).sum()
    assert inter.set_index("group").loc["F×40-59", "n"] == expected
    assert table.set_index(["attribute", "group"]).loc[("sex", "unknown"), "n"] == df["sex"].isna().sum()


def test_point_estimates_match_fairlearn_metricframe():
    df = make_df(seed=3, noise={"A": 0.5, "B": 1.0, "C": 1.5})
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=100).set_index("group")
    mf = MetricFrame(
        metrics={"auroc": roc_auc_score},
        y_true=df["y"],
        y_pred=df["p"],
        sensitive_features=df["group"],
    )
    tpr = MetricFrame(
        metrics={
            "sensitivity": recall_score,
            "specificity": lambda y, pred: recall_score(y, pred, pos_label=0),
        },
        y_true=df["y"].astype(int),
        y_pred=(df["p"] >= 0.5).astype(int),
        sensitive_features=df["group"],
    )
    for g in ("A", "B", "C"):
        assert table.loc[g, "auroc"] == pytest.approx(mf.by_group.loc[g, "auroc"])
        assert table.loc[g, "sensitivity"] == pytest.approx(tpr.by_group.loc[g, "sensitivity"])
        assert table.loc[g, "specificity"] == pytest.approx(tpr.by_group.loc[g, "specificity"])
        assert table.loc[g, "auroc_lo"] < table.loc[g, "auroc"] < table.loc[g, "auroc_hi"]
        assert table.loc[g, "n_patients"] == df.loc[df["group"] == g, "patient_key"].nunique()


def test_unknown_labels_dropped_and_columns_checked():
    df = make_df()
    df.loc[::5, "y"] = np.nan
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=20)
    assert table["n"].sum() == df["y"].notna().sum()
    with pytest.raises(ConfigError, match="site"):
        subgroup_table(df, **KW, attributes=["site"], n_boot=0)
    with pytest.raises(ConfigError, match="cluster_col=None"):
        subgroup_table(df.drop(columns="patient_key"), **KW, attributes=["group"], n_boot=0)
    no_ci = subgroup_table(
        df.drop(columns="patient_key"), **KW, attributes=["group"], cluster_col=None, n_boot=0
    )
    assert no_ci["auroc_lo"].isna().all() and no_ci["auroc"].notna().all()


def test_column_contract_even_without_sufficient_groups():
    df = make_df(n_patients=12)
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=20)
    assert list(table.columns) == [
        "attribute", "group", "n", "n_patients", "n_pos", "prevalence",
        "auroc", "auroc_lo", "auroc_hi", "auroc_ci_method",
        "sensitivity", "sensitivity_lo", "sensitivity_hi", "sensitivity_ci_method",
        "specificity", "specificity_lo", "specificity_hi", "specificity_ci_method", "ece", "status",
    ]  # fmt: skip
    assert table["status"].str.startswith("insufficient").all()
    assert (table[["auroc_ci_method", "sensitivity_ci_method"]] == "none").all().all()
    gaps = subgroup_gaps(df, **KW, attributes=["group"], n_boot=20)
    assert list(gaps.columns) == [
        "attribute",
        "metric",
        "gap",
        "gap_lo",
        "gap_hi",
        "ci_level",
        "ci_method",
        "worst_group",
        "worst_value",
        "best_group",
        "best_value",
        "n_groups",
        "flagged",
        "reason",
    ]
    assert gaps["n_groups"].eq(0).all() and not gaps["flagged"].any()


def test_one_name_per_rate():
    assert subgroups.GAP_METRICS == ("auroc", "sensitivity", "specificity")
    assert subgroups.GROUP_METRICS == ("auroc", "sensitivity", "specificity")
    assert not hasattr(subgroups, "CI_METRICS")  # renamed: evaluate.CI_METRICS is the overall list
    df = make_df(seed=4, noise={"A": 0.5, "B": 1.2})
    gaps = subgroup_gaps(df, **KW, attributes=["group"], n_boot=100).set_index("metric")
    assert list(gaps.index) == ["auroc", "sensitivity", "specificity"]
    fpr = {g: ((d["y"] == 0) & (d["p"] >= 0.5)).sum() / (d["y"] == 0).sum() for g, d in df.groupby("group")}
    row = gaps.loc["specificity"]
    assert row["gap"] == pytest.approx(abs(fpr["A"] - fpr["B"]))  # the specificity gap is the FPR gap
    assert row["worst_value"] == pytest.approx(1 - max(fpr.values()))  # lower specificity is worse
    assert row["best_value"] - row["worst_value"] == pytest.approx(row["gap"])


def test_table_rates_are_clustered_wilson_and_auroc_bootstrap():
    df = make_df(seed=5)
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=100).set_index("group")
    for g in ("A", "B"):
        rows = df[df["group"] == g]
        pos, pred = rows["y"].to_numpy() == 1, rows["p"].to_numpy() >= 0.5
        sens = clustered_wilson(pos & pred, pos, rows["patient_key"].to_numpy())
        assert table.loc[g, ["sensitivity", "sensitivity_lo", "sensitivity_hi"]].tolist() == pytest.approx(
            [sens.point, sens.lo, sens.hi]
        )
        assert (
            table.loc[g, "sensitivity_ci_method"] == table.loc[g, "specificity_ci_method"] == "wilson-cluster"
        )
        assert table.loc[g, "auroc_ci_method"] == "bootstrap"


def test_rate_gap_is_newcombe_at_the_widened_level():
    df = make_df(seed=6, noise={"A": 0.5, "B": 0.9, "C": 1.4})
    gaps = subgroup_gaps(df, **KW, attributes=["group"], n_boot=100).set_index("metric")
    row = gaps.loc["sensitivity"]
    assert row["ci_level"] == pytest.approx(1 - 0.05 / 3) and row["ci_method"] == "newcombe-wilson-cluster"
    ends = []
    for g in (row["best_group"], row["worst_group"]):
        rows = df[df["group"] == g]
        pos, pred = rows["y"].to_numpy() == 1, rows["p"].to_numpy() >= 0.5
        r = clustered_wilson(pos & pred, pos, rows["patient_key"].to_numpy(), row["ci_level"])
        ends.append((r.point, (r.lo, r.hi)))
    _, lo, hi = newcombe_difference(*ends[0], *ends[1])
    assert (row["gap_lo"], row["gap_hi"]) == pytest.approx((lo, hi))
    assert gaps.loc["auroc", "ci_method"] == "bootstrap-normal"


def test_perfect_groups_give_gap_intervals_of_nonzero_width():
    """Two groups both at sensitivity, specificity and AUROC 1.0: gap 0, interval around 0, not flagged."""
    rng = np.random.default_rng(7)
    df = make_df(seed=7, n_patients=120)
    df["p"] = np.where(df["y"] == 1, 0.6 + 0.4 * rng.random(len(df)), 0.4 * rng.random(len(df)))
    table = subgroup_table(df, **KW, attributes=["group"], n_boot=100).set_index("group")
    for m in ("auroc", "sensitivity", "specificity"):
        assert (table[m] == 1.0).all() and (table[f"{m}_hi"] == 1.0).all() and (table[f"{m}_lo"] < 1.0).all()
    assert (table["auroc_ci_method"] == "wilson-auc-fallback").all()
    gaps = subgroup_gaps(df, **KW, attributes=["group"], n_boot=100).set_index("metric")
    assert (gaps["gap"] == 0).all() and not gaps["flagged"].any()
    assert (gaps["gap_lo"] < 0).all() and (gaps["gap_hi"] > 0).all()
    assert gaps.loc["auroc", "ci_method"] == "mover-auc-fallback"
    assert gaps.loc["sensitivity", "ci_method"] == "newcombe-wilson-cluster"


def test_no_resamples_means_no_gap_intervals():
    gaps = subgroup_gaps(make_df(), **KW, attributes=["group"], n_boot=0)
    assert gaps["gap"].notna().all() and gaps["gap_lo"].isna().all() and not gaps["flagged"].any()
    assert (gaps["ci_method"] == "none").all() and gaps["reason"].str.contains("n_boot=0").all()
