"""Peak memory of a real training run on full-size CT volumes: 512 x 512 x 300 voxels, batch 2, on the CPU.

Writes six synthetic 512 x 512 x 300 int16 CT volumes (HU: air, a body ellipse, lungs, a spine; positives carry a
nodule) as NIfTI, then runs ``mt.train`` on them with the ``volumes`` preset (2.5D slices at 64^3) and
``train.batch_size=2``, one epoch of each phase, in a child process whose peak RSS is read from ``getrusage``
(RUSAGE_CHILDREN). Baseline in the same run: a child that only imports medtransfer and torch and builds the
model (what any run pays before reading a scan). The issue's target: under 6 GB.

Usage: python benchmarks/volume_memory.py [--size 512 512 300] [--batch 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD_TRAIN = """
import sys, medtransfer as mt
data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3]
extra = sys.argv[4:]
mt.train(data, labels=data + "/labels.csv", config="volumes", out=out,
         overrides=[f"train.batch_size={batch}", "train.epochs=2", "train.freeze_epochs=1", *extra])
"""
CHILD_BASELINE = """
import medtransfer as mt, torch
from medtransfer.config import load_config
from medtransfer.training.run import build_run_model
cfg = load_config("volumes")
model = build_run_model(cfg, ["a", "b"], "binary")
model(torch.zeros(1, 1, *cfg.input.size))
"""


def write_ct(root: Path, shape: tuple[int, int, int], n: int = 6) -> None:
    """``n`` int16 NIfTI CT volumes (i, j, k) = (x, y, z), 0.7 x 0.7 x 1.25 mm, with labels.csv and a split."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    lungs = ((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1
    rows = []
    for k in range(n):
        vol = np.full(shape, -1000, dtype=np.int16)
        plane = np.where(body, 40, -1000).astype(np.int16)
        plane[lungs] = -850
        plane[(x ** 2 + (y + 0.5) ** 2) < 0.01] = 700  # spine
        vol[:] = plane[:, :, None]
        vol += rng.integers(-20, 20, size=shape, dtype=np.int16)
        label = "nodule" if k % 2 else "normal"
        if label == "nodule":
            cx, cy, cz = shape[0] // 3, shape[1] // 2, shape[2] // 2
            vol[cx - 10:cx + 10, cy - 10:cy + 10, cz - 8:cz + 8] = 30
        name = f"ct-{k}.nii"
        nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.25, 1.0])), str(root / name))
        rows.append(f"{name},{label},P{k},{['train', 'train', 'val', 'val', 'test', 'test'][k % 6]}")
    (root / "labels.csv").write_text("path,label,patient_id,split\n" + "\n".join(rows) + "\n")


def child_peak_gb(code: str, *args: str) -> tuple[float, float]:
    """Run ``code`` in a fresh Python; returns (its peak RSS in GB, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=ROOT)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:  # ru_maxrss of children is the max over all children so far: run the larger one last
        print("warning: this child's peak did not exceed an earlier child's; figure is an upper bound")
    return peak / 1024**2, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    shape = tuple(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ct"
        data.mkdir()
        t0 = time.perf_counter()
        write_ct(data, shape)  # type: ignore[arg-type]
        voxels = shape[0] * shape[1] * shape[2]
        print(f"wrote 6 CT volumes of {shape[0]}x{shape[1]}x{shape[2]} int16 ({voxels * 2 / 1e6:.0f} MB each "
              f"as stored, {voxels * 4 / 1e9:.2f} GB as float32) in {time.perf_counter() - t0:.0f} s", flush=True)
        base_gb, _ = child_peak_gb(CHILD_BASELINE)
        print(f"baseline (import + build the preset's model, one forward): peak RSS {base_gb:.2f} GB", flush=True)
        train_gb, secs = child_peak_gb(CHILD_TRAIN, str(data), str(Path(tmp) / "run"), str(args.batch),
                                       *args.overrides)
        print(f"train (volumes preset, batch {args.batch}, decode + cache + 1 head + 1 unfrozen epoch): "
              f"peak RSS {train_gb:.2f} GB ({train_gb - base_gb:+.2f} GB over the baseline), {secs:.0f} s")
        print(f"target (< 6 GB peak RSS): {'met' if train_gb < 6 else 'NOT met'}")


if __name__ == "__main__":
    main()
