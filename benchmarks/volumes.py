"""Volumes on real data: the ``volumes`` preset against a MONAI 3D network from scratch, on AdrenalMNIST3D-64.

AdrenalMNIST3D (MedMNIST v2, CC BY 4.0; 1,584 real 64^3 adrenal-gland shape volumes from abdominal CT, official
split train 1188 / val 98 / test 298) lives in ``../shared/data/adrenalmnist3d-64``. Published test AUC for a
ResNet-50 with 3D convolutions: 0.828 (MedMNIST v2). The issue's target: the CPU preset reaches test AUROC >= 0.86
in <= 15 min on 2 CPU cores.

Each arm runs in its own process (so its peak RSS is its own): ``mt.train`` with the arm's config on the official
split (the ``split`` column of labels.csv), then ``mt.evaluate`` on the test split (AUROC with a patient-bootstrap
CI). Printed per arm: wall seconds (index + train + calibrate), s/volume, test AUROC (CI), peak RSS; then the
ratio of the preset's test AUROC and time to the scratch baseline's.

Usage: python benchmarks/volumes.py [--data ../shared/data/adrenalmnist3d-64] [--arms volumes,native]
       [--set key=value ...] (overrides apply to every arm)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: arm name -> (config preset, overrides). ``native``: a MONAI 3D ResNet from random weights, same data, same
#: epoch budget as the preset's fine-tuning, the baseline the transfer audit compares against.
ARMS: dict[str, tuple[str, list[str]]] = {
    "volumes": ("volumes", []),
    # at 32^3 (MedMNIST's published 3D baselines ran at 28^3): 3D convolutions from scratch at 64^3 cost ~5 min
    # an epoch here, and a from-scratch network needs many epochs
    "native": ("volumes", ["model.volume=native", "model.backbone=resnet10_3d", "model.weights=none",
                           "train.strategy=fine-tune", "train.epochs=10", "train.lr=0.001",
                           "train.patience=10", "input.size=[32,32,32]"]),
}


def run_arm(name: str, data: Path, overrides: list[str], out: Path) -> dict:
    """Train and evaluate one arm in this process; returns its figures."""
    import medtransfer as mt

    preset, arm_overrides = ARMS[name]
    t0 = time.perf_counter()

    def show(r: dict) -> None:
        print(f"  [{name}] epoch {r['epoch']} {r['phase']}: val_auroc {r['val_auroc']:.4f} ({r['seconds']:.0f}s)",
              file=sys.stderr, flush=True)

    run = mt.train(data, labels=data / "labels.csv", config=preset, overrides=[*arm_overrides, *overrides],
                   out=out / name, on_epoch=show)
    train_s = time.perf_counter() - t0
    result = mt.evaluate(run, split="test", n_boot=500, subgroups=())
    row = result.overall.iloc[0]
    n = len(run.manifest)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"arm": name, "seconds": round(train_s, 1), "s_per_volume": round(train_s / max(n, 1), 3),
            "test_auroc": float(row["auroc"]), "lo": float(row["auroc_lo"]), "hi": float(row["auroc_hi"]),
            "peak_rss_gb": round(rss_gb, 2), "volumes": n, "epochs": int(run.card.training.get("epochs_run", 0)),
            "model": f"{run.card.backbone} ({run.config.model.volume}, {run.config.train.strategy})",
            "input": list(run.card.input.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "adrenalmnist3d-64"))
    ap.add_argument("--arms", default="volumes,native")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "labels.csv").is_file():
        sys.exit(f"{data} not found: this benchmark needs the shared AdrenalMNIST3D-64 volumes")
    if args.arm:
        print(json.dumps(run_arm(args.arm, data, args.overrides, Path(args.out))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in [a for a in args.arms.split(",") if a]:
            cmd = [sys.executable, __file__, "--data", str(data), "--arm", arm, "--out", tmp,
                   *[f"--set={o}" for o in args.overrides]]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{r['arm']:>8}: {r['model']}, input {r['input']}: test AUROC {r['test_auroc']:.3f} "
                  f"({r['lo']:.3f}-{r['hi']:.3f}), {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min, "
                  f"{r['s_per_volume']:.3f} s/volume), peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    by = {r["arm"]: r for r in results}
    if "volumes" in by:
        v = by["volumes"]
        ok = v["test_auroc"] >= 0.86 and v["seconds"] <= 15 * 60
        print(f"target (test AUROC >= 0.86 in <= 15 min): {'met' if ok else 'NOT met'}")
    if "volumes" in by and "native" in by:
        v, s = by["volumes"], by["native"]
        print(f"preset vs native from scratch: AUROC {v['test_auroc'] - s['test_auroc']:+.3f}, "
              f"time x{v['seconds'] / max(s['seconds'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
