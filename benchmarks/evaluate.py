"""Evaluation benchmark: the inference pass vs everything after it, on ~1,000 test cases.

Generates tiny DICOMs (``--size`` px; 3 sites, both sexes, a range of ages, some patients with two images)
with a labels CSV that fixes the splits: a small train/val set for a quick linear probe and ``--n-test``
test cases. Then times ``medtransfer.evaluate`` (n_boot resamples by patient, subgroups sex/age_band/site):

- inference: the one batched no-grad pass (decode + preprocess + model), cold and with a warm image cache;
- statistics: everything after it: metrics with bootstrap CIs, calibration (ECE/Brier before/after
  temperature, reliability curves), subgroup tables and gaps with CIs. Target: seconds, not minutes.

Usage: python benchmarks/evaluate.py [--n-test 1000] [--size 48] [--n-boot 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import medtransfer as mt  # noqa: E402
from tests.evaluation.test_evaluate import PROBE, binary_data  # noqa: E402

SITES = ("Alpha Hospital", "Beta Hospital", "Gamma Clinic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=1000, help="test cases (split over 3 sites x 2 classes)")
    parser.add_argument("--size", type=int, default=48, help="image size in pixels (also the model input)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    root = args.keep or Path(tempfile.mkdtemp(prefix="mt-bench-eval-"))
    per_cell = -(-args.n_test // (len(SITES) * 2))
    try:
        t = time.perf_counter()
        binary_data(root, sites=SITES, sizes=(("train", 12), ("val", 12), ("test", per_cell)), seed=0)
        print(f"generated {per_cell * 6 + 144} DICOMs in {time.perf_counter() - t:.1f}s")
        overrides = [*PROBE, f"input.size=[{args.size}, {args.size}]"]
        t = time.perf_counter()
        run = mt.train(root / "data", labels=root / "labels.csv", overrides=overrides, out=root / "run")
        print(f"trained a linear probe in {time.perf_counter() - t:.1f}s (val AUROC "
              f"{run.card.training['best_val_auroc']:.3f}, T={run.card.temperature:.2f})")
        for label in ("cold image cache", "warm image cache"):
            t = time.perf_counter()
            result = mt.evaluate(run, n_boot=args.n_boot)
            total = time.perf_counter() - t
            timing = result.meta["timing"]
            print(f"evaluate ({label}): {result.meta['n_cases']} cases, {result.meta['n_patients']} patients, "
                  f"n_boot={args.n_boot}: inference {timing['inference_s']:.2f}s "
                  f"({result.meta['n_cases'] / max(timing['inference_s'], 1e-9):.0f} cases/s), statistics "
                  f"{timing['statistics_s']:.2f}s, total {total:.2f}s")
        row = result.overall.iloc[0]
        print(f"AUROC {row['auroc']:.3f} ({row['auroc_lo']:.3f}-{row['auroc_hi']:.3f}); "
              f"{len(result.by_group)} subgroup rows, {int(result.gaps['flagged'].sum())} gaps flagged")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
