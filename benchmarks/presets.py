"""What the presets cost on real chest X-rays, against hand-written baselines in the same run (issue 15).

(a) ``quickstart`` on kermany-cxr-600 (600 real 224-px paediatric chest X-rays): train + evaluate wall time and
    test AUROC (target <= 5 min, AUROC >= 0.98).
(b) ``quickstart`` on the same X-rays box-downsampled to 28 px (a MedMNIST-sized set), optionally each image
    repeated R times under its patient's id (so copies never straddle splits) to time a ~5,000-image set:
    wall time and test AUROC (target <= 10 min for ~5,000 images, AUROC >= 0.97). The input size is fitted to
    the data (64 px), which is what makes this fast.
(c) ``linear-probe`` (train + evaluate) vs a hand-written frozen-feature extraction (PIL decode, resize,
    normalise, the same backbone with no_grad, NCHW float32) + scikit-learn LogisticRegression on the same
    patient split: wall time ratio (target <= 1.2x) and both test AUROCs; images repeated R times as in (b)
    to reach the issue's 5,856.

Usage: python benchmarks/presets.py [--data ../shared/data/kermany-cxr-600] [--parts a b c] [--repeat-28 8]
       [--repeat-probe 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import medtransfer as mt  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kermany-cxr-600"
QUIET = ["eval.n_boot=200"]


def _auroc_from(res: object) -> float:
    from sklearn.metrics import roc_auc_score

    df = res.predictions  # type: ignore[attr-defined]
    df = df[df["error"].fillna("") == ""]
    return float(roc_auc_score(df["true_pneumonia"], df["p_pneumonia"]))


def _copy_set(src: Path, out: Path, *, size: int | None, repeat: int) -> Path:
    """``src`` as PNGs (downsampled to ``size`` when given), each image ``repeat`` times under its patient's id, so
    that the copies of an image always fall in the same split (no leakage between train and test)."""
    from PIL import Image

    df = pd.read_csv(src / "labels.csv")
    rows = []
    for _, r in df.iterrows():
        img = Image.open(src / r["path"]).convert("L")
        if size:
            img = img.resize((size, size), Image.BOX)
        for k in range(repeat):
            rel = Path(r["path"]).with_suffix("").as_posix() + (f"_r{k}" if repeat > 1 else "") + ".png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(out / rel)
            rows.append({"path": rel, "label": r["label"], "patient_id": r["patient_id"]})  # copies: one patient
    pd.DataFrame(rows).to_csv(out / "labels.csv", index=False)
    return out


def part_a(data: Path, tmp: Path) -> None:
    t0 = time.perf_counter()
    run = mt.train(data, labels=data / "labels.csv", config="quickstart", overrides=QUIET, out=tmp / "a")
    train_s = time.perf_counter() - t0
    auroc = _auroc_from(mt.evaluate(run.path, n_boot=200))
    total = time.perf_counter() - t0
    print(f"(a) quickstart on {len(run.manifest)} real 224-px X-rays: train {train_s:.0f} s + evaluate = {total:.0f} s "
          f"(target <= 300 s), input {list(run.card.input.size)}, test AUROC {auroc:.3f} (target >= 0.98)")


def part_b(data: Path, tmp: Path, repeat: int) -> None:
    for r in sorted({1, repeat}):
        src = _copy_set(data, tmp / f"b28x{r}", size=28, repeat=r)
        t0 = time.perf_counter()
        run = mt.train(src, labels=src / "labels.csv", config="quickstart", overrides=QUIET, out=tmp / f"b{r}")
        auroc = _auroc_from(mt.evaluate(run.path, n_boot=200))
        total = time.perf_counter() - t0
        print(f"(b) quickstart on {len(run.manifest)} 28-px X-rays ({r} cop{'y' if r == 1 else 'ies'} of each): "
              f"{total:.0f} s train + evaluate (target <= 600 s for ~5,000), input {list(run.card.input.size)} "
              f"({run.card.training.get('input_size', {}).get('reason', '')[:40]}...), test AUROC {auroc:.3f} "
              f"(target >= 0.97)")


def part_c(data: Path, tmp: Path, repeat: int) -> None:
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from medtransfer.models.classifier import build_model

    src = _copy_set(data, tmp / f"c224x{repeat}", size=None, repeat=repeat) if repeat > 1 else data
    t0 = time.perf_counter()
    run = mt.train(src, labels=src / "labels.csv", config="linear-probe", overrides=QUIET, out=tmp / "c")
    res = mt.evaluate(run.path, n_boot=200)
    ours = time.perf_counter() - t0
    auroc_ours = _auroc_from(res)

    # the hand-written baseline, on the run's own patient split
    m = run.manifest
    spec = run.card.input
    t0 = time.perf_counter()
    model = build_model("efficientnet_lite0", m.classes, task=m.task, weights="imagenet").eval()
    mean, std = np.float32(spec.mean[0]), np.float32(spec.std[0])
    feats = []
    paths = [m.data_dir / p for p in m.df["path"]]
    with torch.no_grad():
        for i in range(0, len(paths), 32):
            batch = [np.asarray(Image.open(p).convert("L").resize(tuple(spec.size), Image.BILINEAR), np.float32) / 255
                     for p in paths[i:i + 32]]
            x = torch.from_numpy((np.stack(batch)[:, None] - mean) / std)
            feats.append(model.features(x).numpy())
    f = np.concatenate(feats)
    y = (m.df["label"] == "pneumonia").to_numpy().astype(int)
    split = m.df["split"].to_numpy()
    trainval = np.isin(split, ["train", "val"])
    clf = LogisticRegression(max_iter=2000).fit(f[trainval], y[trainval])
    auroc_base = roc_auc_score(y[split == "test"], clf.predict_proba(f[split == "test"])[:, 1])
    base = time.perf_counter() - t0
    print(f"(c) linear probe on {len(m)} 224-px X-rays: medtransfer train+evaluate {ours:.0f} s (test AUROC "
          f"{auroc_ours:.3f}) vs hand-written features + LogisticRegression {base:.0f} s (test AUROC {auroc_base:.3f}) "
          f"-> {ours / base:.2f}x the baseline's time (target <= 1.2x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"])
    ap.add_argument("--repeat-28", type=int, default=8, help="copies of each image for (b)'s timing set")
    ap.add_argument("--repeat-probe", type=int, default=10, help="copies of each image for (c)")
    args = ap.parse_args()
    if not (args.data / "labels.csv").is_file():
        sys.exit(f"{args.data}/labels.csv not found: pass --data with kermany-cxr-600")
    import torch

    print(f"torch threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        if "a" in args.parts:
            part_a(args.data, t)
        if "b" in args.parts:
            part_b(args.data, t, args.repeat_28)
        if "c" in args.parts:
            part_c(args.data, t, args.repeat_probe)


if __name__ == "__main__":
    main()
