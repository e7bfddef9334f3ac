"""Real-data check of adaptation with a few labels (issue 19 items 2-3) on ../shared/data/kermany-cxr-600.

A linear probe (efficientnet_lite0, ImageNet weights, 64 px) is trained on half of the patients. The "site" is
the other patients' images as another hospital might deliver them (a gamma change, which the preprocessing does
not undo, so the model's probabilities drift), with labels for ``--n-labels`` of them. ``mt.adapt`` then checks
the shift, splits the labelled cases by patient into adapt/holdout, tries every option and keeps one only when its
CI says it helps. Printed: the shift verdict, the options table (holdout AUROC, sensitivity/specificity at the
operating point and ECE with 95% CIs), the chosen profile; then the whole site evaluated with and without it.

Usage: python benchmarks/adapt.py [--data ../shared/data/kermany-cxr-600] [--n-labels 100] [--kind contrast]
       [--seeds 0,1,2,3,4]   (several draws of the labelled patients and of the adapt/holdout split; a summary
                              line per seed and, at the end, how often each option was kept)
A few minutes per seed on two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import medtransfer as mt  # noqa: E402
from benchmarks.shift import PROBE, degrade, real_data  # noqa: E402

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 30)


def write_labelled_site(data: Path, rows: pd.DataFrame, out: Path, kind: str, seed: int) -> Path:
    """The cases of ``rows`` degraded (``kind``), as JPEG in class folders (the labels)."""
    rng = np.random.default_rng(seed)
    for i, (rel, label) in enumerate(zip(rows["path"], rows["label"], strict=True)):
        img = np.asarray(Image.open(data / rel).convert("L"), dtype=np.float64)
        target = out / str(label) / f"{i:04d}.jpeg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(degrade(img, kind, rng), 0, 255).astype(np.uint8)).save(target, quality=95)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kermany-cxr-600"))
    ap.add_argument("--n-labels", type=int, default=100)
    ap.add_argument("--kind", default="contrast", choices=("contrast", "noise", "resolution"))
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--prevalence", type=float, default=None,
                    help="also shift the label prevalence: keep this share of pneumonia patients at the site")
    ap.add_argument("--sensitivity", type=float, default=None,
                    help="train with an operating point at this validation sensitivity (eval.threshold=sensitivity); "
                         "adapt then keeps an option only if its holdout sensitivity CI reaches it")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds: draws of the labelled patients and splits")
    args = ap.parse_args()
    data, labels, patients = real_data(args.data)
    train_p, site_p = set(patients[: len(patients) // 2]), set(patients[len(patients) // 2:])
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        csv = Path(tmp) / "train_labels.csv"
        labels[labels["patient_id"].isin(train_p)].to_csv(csv, index=False)
        rule = [] if args.sensitivity is None else ["eval.threshold=sensitivity", f"eval.target={args.sensitivity}"]
        run = mt.load_run(mt.train(data, labels=csv, overrides=[*PROBE, *rule], out=Path(tmp) / "run").path)
        print(f"trained on {len(run.manifest)} images of {len(train_p)} patients at 64 px "
              f"({time.perf_counter() - t:.0f}s); operating point(s): {run.card.thresholds}", flush=True)
        site_rows = labels[labels["patient_id"].isin(site_p)]
        if args.prevalence is not None:  # another prevalence: drop pneumonia patients until the share is reached
            pos = site_rows.loc[site_rows["label"] != "normal", "patient_id"].drop_duplicates()
            neg = site_rows.loc[site_rows["label"] == "normal", "patient_id"].nunique()
            n_pos = int(round(args.prevalence / (1 - args.prevalence) * neg))
            drop = set(pos.sample(frac=1.0, random_state=2).iloc[n_pos:])
            site_rows = site_rows[~site_rows["patient_id"].isin(drop)]
            print(f"site prevalence {float((site_rows['label'] != 'normal').mean()):.2f} "
                  f"(training {float((run.manifest.df['label'] != 'normal').mean()):.2f})")
        summary = []
        for seed in [int(x) for x in args.seeds.split(",")]:
            summary.append(one_seed(args, run, data, site_rows, site_p, Path(tmp) / f"seed{seed}", seed))
        print("\nsummary over seeds (holdout = the labelled cases adapt did not fit on; rest = the site's other "
              "images, never seen by adapt):")
        table = pd.DataFrame(summary)
        print(table.to_string(index=False))
        print("\noptions kept:", table["chosen"].value_counts().to_dict())
        for col in ("rest_ece_change", "rest_auroc_change", "rest_sens_change"):
            print(f"{col}: mean {table[col].mean():+.4f}, min {table[col].min():+.4f}, max {table[col].max():+.4f}")


def one_seed(args: argparse.Namespace, run: mt.Run, data: Path, site_rows: pd.DataFrame, site_p: set,
             tmp: Path, seed: int) -> dict:
    """One draw of ``--n-labels`` labelled site images (whole patients), adapted and checked on the rest."""
    chosen_p = pd.Series(sorted(site_p)).sample(frac=1.0, random_state=1 + seed)
    keep, n = [], 0
    for p in chosen_p:  # whole patients until --n-labels images
        k = int((site_rows["patient_id"] == p).sum())
        if n + k > args.n_labels:
            continue
        keep.append(p)
        n += k
    labelled = site_rows[site_rows["patient_id"].isin(keep)]
    folder = write_labelled_site(data, labelled, tmp / "site", args.kind, seed)
    everything = write_labelled_site(data, site_rows[~site_rows["patient_id"].isin(keep)], tmp / "site-rest",
                                     args.kind, 1000 + seed)
    t = time.perf_counter()
    result = mt.adapt(run, folder, name="site", n_boot=args.n_boot, seed=seed)
    print(f"\n[seed {seed}] adapt with {len(labelled)} labelled images ({len(keep)} patients), {args.kind} shift "
          f"({time.perf_counter() - t:.0f}s):")
    print(result.summary())
    cols = [c for c in result.table.columns if not c.startswith("note") and c != "thresholds"]
    print(result.table[cols].to_string(index=False))
    # the rest of the site, never seen by adapt: unadapted vs the chosen profile
    before = mt.evaluate(run, everything, n_boot=args.n_boot, subgroups=(), out_dir=tmp / "ev-before")
    after = mt.evaluate(mt.load_site(run, result.folder), everything, n_boot=args.n_boot, subgroups=(),
                        out_dir=tmp / "ev-after")
    figures = {}
    for name, ev in (("unadapted", before), ("site profile", after)):
        r = ev.overall.iloc[0]
        cal = ev.calibration
        ece = cal["ece"][0] if isinstance(cal, dict) else float(cal.iloc[0]["ece"])
        figures[name] = (float(r["auroc"]), float(r["sensitivity"]), ece)
        print(f"rest of the site ({len(ev.predictions)} images), {name:>12}: AUROC {r['auroc']:.3f} "
              f"({r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}), sensitivity {r['sensitivity']:.3f} "
              f"({r['sensitivity_lo']:.3f}-{r['sensitivity_hi']:.3f}), specificity {r['specificity']:.3f} "
              f"({r['specificity_lo']:.3f}-{r['specificity_hi']:.3f}), ECE {ece:.3f}")
    tab = result.table.set_index("option")
    chosen = str(tab.index[tab["chosen"]][0])
    row = {"seed": seed, "labelled": len(labelled), "shift_p": result.shift.p_value, "chosen": chosen,
           "holdout_ece_unadapted": tab.loc["unadapted", "ece"], "holdout_ece_chosen": tab.loc[chosen, "ece"]}
    for opt in ("temperature+threshold", "head+temperature+threshold", "prevalence"):
        if opt in tab.index:
            row[f"{opt}_ece_change_ci"] = f"{tab.loc[opt, 'ece_change_lo']:+.3f}..{tab.loc[opt, 'ece_change_hi']:+.3f}"
    (a0, s0, e0), (a1, s1, e1) = figures["unadapted"], figures["site profile"]
    row.update({"rest_ece_change": e1 - e0, "rest_auroc_change": a1 - a0, "rest_sens_change": s1 - s0,
                "rest_sens_chosen": s1})
    return row

if __name__ == "__main__":
    main()
