"""Real-data check of the shift check (issue 19 item 1) on ../shared/data/kermany-cxr-600.

A linear probe (efficientnet_lite0, ImageNet weights, 64 px input) is trained on half of the patients. The
other patients are split in two: from one half, five seeded draws of held-out patients as they are (the
no-shift control: must NOT be flagged), plus the same images merely re-encoded (JPEG, as the degraded ones are);
from the other half, three degraded "sites": downsampled to 32 px then upsampled back, another contrast
(gamma 0.6), added Gaussian noise (SD 12 grey levels). Prints p-values, MMD p-values and domain AUROCs.

Usage: python benchmarks/shift.py [--data ../shared/data/kermany-cxr-600] [--n-site 100] [--n-perm 1000]
A few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
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
from medtransfer.adapt.shift import ShiftReport, check_shift  # noqa: E402

SIZE = 64
PROBE = [f"input.size=[{SIZE}, {SIZE}]", "train.strategy=linear-probe", "train.epochs=30", "train.lr=0.01",
         "train.num_workers=0", "train.augment.enabled=false"]


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A grey image (H, W) float 0-255 as another site might deliver it."""
    if kind == "resolution":
        h, w = img.shape
        small = Image.fromarray(img.astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        return np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.float64)
    if kind == "contrast":
        return 255 * (img / 255) ** 0.6
    if kind == "noise":
        return img + 12 * rng.standard_normal(img.shape)
    if kind == "re-encoded":
        return img
    raise ValueError(kind)


def write_site(data: Path, rows: pd.DataFrame, out: Path, kind: str | None, seed: int) -> Path:
    """The cases of ``rows`` in a flat folder without labels: copied as they are, or degraded and saved as JPEG."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for i, rel in enumerate(rows["path"]):
        if kind is None:
            shutil.copy(data / rel, out / f"{i:04d}.jpeg")
            continue
        img = np.asarray(Image.open(data / rel).convert("L"), dtype=np.float64)
        Image.fromarray(np.clip(degrade(img, kind, rng), 0, 255).astype(np.uint8)).save(out / f"{i:04d}.jpeg",
                                                                                       quality=95)
    return out


def real_data(path: str) -> tuple[Path, pd.DataFrame, list[str]]:
    """The shared chest X-ray subset: its folder, labels and patients in a seeded order (exits when absent)."""
    data = Path(path)
    if not data.is_dir():
        sys.exit(f"{data} not found: this check needs the shared real chest X-ray subset")
    labels = pd.read_csv(data / "labels.csv")
    return data, labels, labels["patient_id"].drop_duplicates().sample(frac=1.0, random_state=0).tolist()


def show(name: str, r: ShiftReport, seconds: float) -> None:
    lo, hi = r.domain_auroc_ci
    print(f"{name:>18}: shift={str(r.shift):5} p={r.p_value:.3g}  MMD p={r.mmd_p_value:.3g}  domain AUROC "
          f"{r.domain_auroc:.3f} [{lo:.3f}-{hi:.3f}] (p={r.domain_p_value:.3g})  n={r.method['n_site']} vs "
          f"{r.method['n_reference']}  ({seconds:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kermany-cxr-600"))
    ap.add_argument("--n-site", type=int, default=100, help="cases per site")
    ap.add_argument("--n-perm", type=int, default=1000)
    args = ap.parse_args()
    data, labels, patients = real_data(args.data)
    half = len(patients) // 2
    train_p, held_p = set(patients[:half]), patients[half:]
    control_p, shift_p = set(held_p[: len(held_p) // 2]), set(held_p[len(held_p) // 2:])
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        csv = Path(tmp) / "train_labels.csv"
        labels[labels["patient_id"].isin(train_p)].to_csv(csv, index=False)
        run = mt.train(data, labels=csv, overrides=PROBE, out=Path(tmp) / "run")
        run = mt.load_run(run.path)
        print(f"trained on {len(run.manifest)} images of {len(train_p)} patients at {SIZE} px "
              f"({time.perf_counter() - t:.0f}s); reference = val ({len(run.manifest.split('val'))} images)")
        control = labels[labels["patient_id"].isin(control_p)]
        shifted = labels[labels["patient_id"].isin(shift_p)]
        for seed in range(5):
            t = time.perf_counter()
            rows = control.sample(n=min(args.n_site, len(control)), random_state=seed)
            folder = write_site(data, rows, Path(tmp) / f"control{seed}", None, seed)
            r = check_shift(run, mt.index_scans(folder, require_labels=False), n_perm=args.n_perm, seed=seed)
            show(f"control seed {seed}", r, time.perf_counter() - t)
        rows = shifted.sample(n=min(args.n_site, len(shifted)), random_state=0)
        for kind in ("re-encoded", "resolution", "contrast", "noise"):
            t = time.perf_counter()
            folder = write_site(data, rows, Path(tmp) / kind, kind, 0)
            r = check_shift(run, mt.index_scans(folder, require_labels=False), n_perm=args.n_perm)
            show(kind, r, time.perf_counter() - t)
            print(f"{'':>20}{r.verdict}")


if __name__ == "__main__":
    main()
