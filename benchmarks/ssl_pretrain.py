"""Does ImageNet -> self-supervised pretraining on the hospital's own scans beat ImageNet alone? (issue 21)

On ../shared/data/kermany-cxr-600 (600 real paediatric chest X-rays, whole patients): the images are split by
patient into train/val/test (medtransfer's default split). Each SSL method in ``--methods`` continues the
bundled ImageNet EfficientNet-Lite0 on the train+val images *without their labels* (``medtransfer pretrain``,
the test patients left out). Then the transfer audit trains every source (ImageNet, each SSL folder, and
scratch) with each strategy on a fraction of the training patients' labels (``--fractions``; 0.1 = labels
hidden for 90% of the training patients), under the same epoch budget, and scores all of them on the same test
patients (AUROC with a patient-bootstrap CI). Printed: the pretraining losses and times, the audit's learning
curve (sources x strategies x fractions) and the per-cell table.

Usage: python benchmarks/ssl_pretrain.py [--methods simclr,byol,dino] [--size 128] [--ssl-epochs 20]
       [--fractions 0.1,1.0] [--seeds 2] [--strategies linear-probe,fine-tune] [--out /tmp/ssl-bench]
About 10 minutes per method and 20-40 minutes of audit on two CPU cores at 128 px.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import medtransfer as mt  # noqa: E402
from medtransfer.audit.transfer import audit_transfer  # noqa: E402
from medtransfer.config import load_config  # noqa: E402
from medtransfer.pretrain.run import pretrain  # noqa: E402

pd.set_option("display.width", 220)
pd.set_option("display.max_columns", 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kermany-cxr-600"))
    ap.add_argument("--methods", default="simclr")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--ssl-epochs", type=int, default=20)
    ap.add_argument("--ssl-batch", type=int, default=64)
    ap.add_argument("--fractions", default="0.1,1.0")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--strategies", default="linear-probe,fine-tune")
    ap.add_argument("--audit-epochs", type=int, default=6)
    ap.add_argument("--out", default="/tmp/ssl-bench")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "labels.csv").is_file():
        sys.exit(f"{data} not found: this benchmark needs the shared real chest X-ray subset")
    out = Path(args.out)
    common = [f"input.size=[{args.size}, {args.size}]", "train.num_workers=0", "train.batch_size=32"]
    cfg = load_config("quickstart", common)
    manifest = mt.index_scans(data, labels=data / "labels.csv", config=cfg.data, out_dir=out / "index")
    counts = manifest.df.groupby("split")["patient_key"].agg(["size", "nunique"])
    print("split (images, patients):", {k: tuple(v) for k, v in counts.iterrows()}, flush=True)
    # the images pretraining may see: train + val, never test (a split column the pretraining honours)
    listing = out / "pretrain_images.csv"
    manifest.df[["path", "split"]].to_csv(listing, index=False)
    sources = {}
    for method in [m for m in args.methods.split(",") if m]:
        t = time.perf_counter()
        folder = out / f"pt-{method}"
        result = None if (folder / "pretrain.json").is_file() else pretrain(  # an interrupted one resumes
            data, out=folder, labels=listing, overrides=[
                *common, f"pretrain.method={method}", f"pretrain.epochs={args.ssl_epochs}",
                f"pretrain.batch_size={args.ssl_batch}"])
        if result is not None:
            losses = ", ".join(f"{v:.3f}" for v in result.history["loss"])
            print(f"pretrain {method}: {result.images} images, {result.epochs} epochs in "
                  f"{time.perf_counter() - t:.0f}s; loss per epoch: {losses}", flush=True)
        sources[method] = str(folder)
    t = time.perf_counter()
    strategies = ("scratch", *[s for s in args.strategies.split(",") if s])
    audit = audit_transfer(manifest, config=cfg, strategies=strategies,
                           fractions=[float(f) for f in args.fractions.split(",")], seeds=args.seeds,
                           budget_epochs=args.audit_epochs, n_boot=500, out=out / "audit", sources=sources)
    print(f"\naudit: {len(audit.cells)} cells in {time.perf_counter() - t:.0f}s (resumed cells count 0)")
    print("\nlearning curve (mean over seeds; test AUROC, mean CI):")
    print(audit.curve[["strategy", "fraction", "test_auroc", "sd", "test_lo", "test_hi", "seconds", "seeds"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\ncells:")
    print(audit.cells[["strategy", "fraction", "seed", "n_train_patients", "n_train", "test_auroc", "test_lo",
                       "test_hi", "seconds"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for w in audit.warnings:
        print("warning:", w)


if __name__ == "__main__":
    main()
