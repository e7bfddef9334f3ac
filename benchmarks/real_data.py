"""Real-data check: default settings on real paediatric chest X-rays (../shared/data/kermany-cxr-600).

Trains with the defaults (efficientnet_lite0 with its bundled ImageNet weights, gradual unfreezing, 224 px)
and, with --scratch, the same recipe from random weights; prints per-epoch validation AUROC and the test
AUROC of each, so "pretrained beats scratch" and "test AUROC > 0.95" are measured in one run.

Usage: python benchmarks/real_data.py [--data ../shared/data/kermany-cxr-600] [--scratch] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import medtransfer as mt  # noqa: E402
from medtransfer.data.dataset import ScanDataset, make_loader  # noqa: E402
from medtransfer.device import resolve_device  # noqa: E402
from medtransfer.stats.metrics import macro_auroc  # noqa: E402
from medtransfer.training.loop import predict_batches  # noqa: E402


def test_auroc(run: mt.training.run.Run) -> float:  # type: ignore[name-defined]
    """AUROC of the run's best model on its own test split."""
    test = run.manifest.split("test")
    loader = make_loader(ScanDataset(test, run.card.input, cache_dir=run.path / "cache"), batch_size=32,
                         shuffle=False)
    pred = predict_batches(run.model, loader, task=run.card.task, device=resolve_device("cpu"))
    return macro_auroc(pred["targets"], pred["scores"], run.card.task, len(run.card.classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kermany-cxr-600"))
    ap.add_argument("--scratch", action="store_true", help="also train from random weights, same budget")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"{data} not found: this check needs the shared real chest X-ray subset")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ["imagenet"] + (["none"] if args.scratch else []):
            t0 = time.perf_counter()

            def show(r: dict, tag: str = weights) -> None:
                print(f"  [{tag}] epoch {r['epoch']} {r['phase']}: val_auroc {r['val_auroc']:.4f} "
                      f"({r['seconds']:.0f}s)", flush=True)

            run = mt.train(data, labels=data / "labels.csv", out=Path(tmp) / weights,
                           overrides=[f"model.weights={weights}", *args.overrides], on_epoch=show)
            results[weights] = (test_auroc(run), float(run.history["val_auroc"].max()), time.perf_counter() - t0)
    for weights, (test, val, secs) in results.items():
        name = "pretrained (ImageNet)" if weights == "imagenet" else "scratch"
        print(f"{name:>22}: best val AUROC {val:.4f}, test AUROC {test:.4f}, {secs:.0f}s")


if __name__ == "__main__":
    main()
