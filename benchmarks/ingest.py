"""Ingest benchmark: DICOM decode + preprocess throughput, uncached vs cached, and indexing speed.

Generates ``--n`` 12-bit (stored in 16) ``--size`` x ``--size`` chest-like DICOMs in a temporary folder
(two class sub-folders), then reports:

- indexing cases/s through ``medtransfer.data.discovery.index_scans`` (headers only, and with the pixel check),
  when that module exists;
- images/s through ``ScanDataset`` + ``make_loader`` (decode, window, resize to ``--out`` px, normalise):
  epoch 1 with a fresh disk cache (every case decoded and written), epoch 2 (read from the ``.npy`` cache),
  and the ratio (target >= 5x).

Usage: python benchmarks/ingest.py [--n 300] [--size 512] [--out 224] [--batch-size 32] [--workers 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medtransfer.config import DataConfig  # noqa: E402
from medtransfer.data.dataset import ScanDataset, make_loader  # noqa: E402
from medtransfer.data.manifest import Manifest  # noqa: E402
from medtransfer.data.spec import InputSpec  # noqa: E402
from tests.factories import chest_like, write_dicom  # noqa: E402

CLASSES = ("normal", "pneumonia")


def generate(root: Path, n: int, size: int) -> Manifest:
    """Write ``n`` DICOMs under ``root/<class>/`` and return a manifest built directly (no indexing)."""
    rows = []
    for i in range(n):
        label = CLASSES[i % 2]
        rel = f"{label}/IM-{i:05d}.dcm"
        write_dicom(root / rel, chest_like(size, seed=i), bits_stored=12, window=(2048, 4096),
                    patient_id=f"P{i:05d}", photometric="MONOCHROME1" if i % 10 == 0 else "MONOCHROME2")
        rows.append({"case_id": f"c{i}", "patient_key": f"p{i}", "path": rel, "files": "", "format": "dicom",
                     "label": label, "split": "train"})
    return Manifest(pd.DataFrame(rows), list(CLASSES), "binary", root)


def time_epoch(ds: ScanDataset, batch_size: int, workers: int) -> tuple[float, int]:
    """Seconds for one pass over ``ds`` through a loader, and the number of images seen."""
    loader = make_loader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=False)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += int(batch["image"].shape[0])
    return time.perf_counter() - start, seen


def time_indexing(root: Path, n: int) -> list[tuple[str, str]]:
    try:
        from medtransfer.data.discovery import index_scans
    except ImportError:
        return [("indexing", "not available yet")]
    rows = []
    for verify in (False, True):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            manifest = index_scans(root, config=DataConfig(verify_pixels=verify), out_dir=out)
            seconds = time.perf_counter() - start
        what = "indexing (headers + pixel check)" if verify else "indexing (headers)"
        rows.append((what, f"{len(manifest) / seconds:8.1f} cases/s  ({len(manifest)}/{n} cases, {seconds:.2f} s)"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="number of DICOM files")
    p.add_argument("--size", type=int, default=512, help="generated image side (pixels)")
    p.add_argument("--out", type=int, default=224, help="model input side (pixels)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "scans", Path(tmp) / "cache"
        start = time.perf_counter()
        manifest = generate(root, args.n, args.size)
        gen_s = time.perf_counter() - start
        rows = [("generate DICOMs", f"{args.n} x {args.size}x{args.size} uint16 in {gen_s:.1f} s")]
        rows += time_indexing(root, args.n)

        spec = InputSpec(size=(args.out, args.out))
        ds = ScanDataset(manifest, spec, cache_dir=cache)
        cold_s, seen = time_epoch(ds, args.batch_size, args.workers)
        warm_s, _ = time_epoch(ds, args.batch_size, args.workers)
        rerun = ScanDataset(manifest, spec, cache_dir=cache)
        rerun_s, _ = time_epoch(rerun, args.batch_size, args.workers)
        cache_mb = sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20
        rows += [
            ("epoch 1 (decode + preprocess)", f"{seen / cold_s:8.1f} images/s  ({cold_s:.2f} s, {ds.decode_count} decoded)"),
            ("epoch 2 (disk cache)", f"{seen / warm_s:8.1f} images/s  ({warm_s:.2f} s)"),
            ("second run (disk cache)", f"{seen / rerun_s:8.1f} images/s  ({rerun_s:.2f} s, {rerun.decode_count} decoded)"),
            ("cached / uncached", f"{cold_s / warm_s:8.1f} x  (target >= 5x)"),
            ("cache size", f"{cache_mb:8.1f} MiB  ({cache_mb * 1024 / max(seen, 1):.0f} KiB/case)"),
        ]
    width = max(len(k) for k, _ in rows)
    print(f"ingest benchmark: n={args.n}, {args.size}px -> {args.out}px, batch {args.batch_size}, "
          f"workers {args.workers}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
