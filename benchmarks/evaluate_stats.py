"""Statistics benchmark: how long the evaluation numbers take for one scored class.

On ``--n`` synthetic cases (about 0.7 n patients, some with two images; three subgroup attributes, one
with a planted weakness) it times, with ``--n-boot`` patient-level resamples:

- overall metrics with CIs (``metric_intervals``, all 8 metrics: clustered Wilson for the 5 proportions,
  patient bootstrap for F1/AUROC/AUPRC), and AUROC alone;
- calibration (ECE equal-width + adaptive, Brier, reliability curve) and a Youden threshold;
- ``subgroup_table`` and ``subgroup_gaps`` for 3 attributes;
- a naive baseline in the same run: scikit-learn ``roc_auc_score`` on each of the same resamples (AUROC only),
  and the speed-up of the vectorised AUROC bootstrap over it.

Acceptance: the whole evaluation (overall + subgroups + gaps) takes seconds, not minutes. The last lines
show the method behind each overall interval and, on a perfectly separated copy of the data, that no
interval collapses to zero width at 1.0.

Usage: python benchmarks/evaluate_stats.py [--n 1000] [--n-boot 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medtransfer.evaluation.subgroups import subgroup_gaps, subgroup_table  # noqa: E402
from medtransfer.stats.bootstrap import metric_intervals, resample_indices  # noqa: E402
from medtransfer.stats.calibration import brier, ece, reliability_curve  # noqa: E402
from medtransfer.stats.thresholds import choose_threshold  # noqa: E402

ATTRIBUTES = ("sex", "age_band", "site")


def synthetic(n: int, seed: int) -> pd.DataFrame:
    """``n`` cases from ~0.7 n patients; site C's scores are noisier (a planted weakness)."""
    rng = np.random.default_rng(seed)
    n_patients = int(0.7 * n)
    pk = np.sort(np.r_[np.arange(n_patients), rng.integers(0, n_patients, n - n_patients)])
    patient = pd.DataFrame(
        {
            "sex": rng.choice(["F", "M"], n_patients),
            "age_band": rng.choice(["18-39", "40-59", "60+"], n_patients),
            "site": rng.choice(["A", "B", "C"], n_patients, p=[0.4, 0.4, 0.2]),
            "y": rng.integers(0, 2, n_patients).astype(float),
        }
    ).iloc[pk]
    sigma = np.where(patient["site"] == "C", 1.8, 0.6)
    p = 1 / (1 + np.exp(-(patient["y"].to_numpy() - 0.5 + sigma * rng.normal(size=n))))
    return patient.reset_index(drop=True).assign(patient_key=pk, p=p)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    df = synthetic(args.n, args.seed)
    y, p, pk = df["y"].to_numpy(), df["p"].to_numpy(), df["patient_key"].to_numpy()
    common = {"y_col": "y", "p_col": "p", "attributes": ATTRIBUTES, "n_boot": args.n_boot, "seed": args.seed}

    times: dict[str, float] = {}
    times["threshold (youden)"], thr = timed(lambda: choose_threshold(y, p))
    times["overall, 8 metrics + CIs"], overall = timed(
        lambda: metric_intervals(y, p, thr, clusters=pk, n_boot=args.n_boot, seed=args.seed)
    )
    times["overall, AUROC + CI only"], _ = timed(
        lambda: metric_intervals(
            y, p, thr, clusters=pk, n_boot=args.n_boot, seed=args.seed, metrics=("auroc",)
        )
    )
    times["calibration (ECE x2, Brier, curve)"], _ = timed(
        lambda: (ece(y, p), ece(y, p, adaptive=True), brier(y, p), reliability_curve(y, p))
    )
    times["subgroup_table, 3 attributes"], _ = timed(lambda: subgroup_table(df, threshold=thr, **common))
    times["subgroup_gaps, 3 attributes"], gaps = timed(lambda: subgroup_gaps(df, threshold=thr, **common))
    total = sum(times.values()) - times["overall, AUROC + CI only"]
    times["naive: sklearn AUROC per resample"], _ = timed(
        lambda: [roc_auc_score(y[i], p[i]) for i in resample_indices(pk, args.n_boot, args.seed)]
    )

    print(
        f"evaluate_stats benchmark: n={len(df)} cases, {df['patient_key'].nunique()} patients, "
        f"n_boot={args.n_boot}, threshold={thr:.3f}"
    )
    width = max(map(len, times))
    for key, value in times.items():
        print(f"  {key:<{width}}  {value * 1000:9.1f} ms")
    print(f"  {'total evaluation (all but naive)':<{width}}  {total * 1000:9.1f} ms")
    ratio = times["naive: sklearn AUROC per resample"] / times["overall, AUROC + CI only"]
    print(f"  AUROC bootstrap speed-up over the naive baseline: {ratio:.0f}x")
    for name, r in overall.items():
        print(f"  {name:<11} {r.point:.3f} (95% CI {r.lo:.3f}-{r.hi:.3f})  {r.method}")
    flagged = gaps.loc[gaps["flagged"], ["attribute", "metric", "gap", "gap_lo", "gap_hi", "ci_method"]]
    print(f"  flagged gaps (planted: site C):\n{flagged.to_string(index=False)}")
    perfect = np.where(y == 1, 0.6 + 0.4 * p, 0.4 * p)  # same cases, perfectly separated at 0.5
    start = time.perf_counter()
    res = metric_intervals(y, perfect, 0.5, clusters=pk, n_boot=args.n_boot, seed=args.seed)
    took = (time.perf_counter() - start) * 1000
    print(f"  perfectly separated copy ({took:.1f} ms):")
    for name in ("auroc", "auprc", "sensitivity", "specificity"):
        r = res[name]
        print(f"  {name:<11} {r.point:.3f} (95% CI {r.lo:.3f}-{r.hi:.3f})  {r.method}")


if __name__ == "__main__":
    main()
