"""Parallel indexing benchmark: files/s of ``index_scans`` with 1 and N header-reading processes, same output.

Writes ``--n`` real-looking DICOM files to a temporary folder: copies of pydicom's ``CT_small.dcm`` (CT series
of ``--slices`` slices, positions 2.5 mm apart) and ``MR_small.dcm`` (single images), each with new UIDs and
patient IDs, ten files per patient folder. Then it indexes the folder (headers only by default, as the parallel
part is the header reading; ``--verify-pixels`` adds the serial pixel check) once per worker count, prints
files/s and the ratio to one worker, and checks that ``manifest.csv``, ``quarantine.csv``, ``manifest.json``
and ``summary.json`` are byte-identical to one worker's (exit status 1 if not).

The first parallel run of a process includes starting the fork server (~1 s, once per process); ``--repeat 2``
shows the warm figure as well.

Usage: python benchmarks/index_parallel.py [--n 3000] [--workers 1,2] [--slices 40] [--repeat 1] [--verify-pixels]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medtransfer.config import DataConfig  # noqa: E402
from medtransfer.data.discovery import PARALLEL_MIN_FILES, index_scans  # noqa: E402

OUTPUTS = ("manifest.csv", "quarantine.csv", "manifest.json", "summary.json")


def generate(root: Path, n: int, slices: int) -> None:
    """Write ``n`` DICOM files: two thirds CT series of ``slices`` slices, one third single MR images."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    n_ct = (2 * n // 3) // slices * slices
    written = 0
    while written < n:
        patient = f"BENCH{written // 10:06d}" if written >= n_ct else f"BENCH{written // slices:06d}"
        if written < n_ct:  # one CT series
            study, series = generate_uid(), generate_uid()
            folder = root / patient / f"ct-{written // slices:05d}"
            for k in range(slices):
                _save(ct, folder / f"IM-{k:04d}.dcm", patient, study, series, z=-75.0 + 2.5 * k, instance=k + 1)
            written += slices
        else:  # single MR images, ten per patient folder
            _save(mr, root / patient / f"MR-{written:06d}.dcm", patient, generate_uid(), generate_uid(), z=None,
                  instance=1)
            written += 1


def _save(template, path: Path, patient: str, study: str, series: str, *, z: float | None, instance: int) -> None:
    from pydicom.uid import generate_uid

    ds = template.copy()
    ds.PatientID = patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = instance
    if z is not None:
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z]
        ds.SliceLocation = z
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="number of DICOM files (2,000+ for the issue's check)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts; the first is the reference")
    p.add_argument("--slices", type=int, default=40, help="slices per CT series")
    p.add_argument("--repeat", type=int, default=1, help="runs per worker count (the fastest is reported)")
    p.add_argument("--verify-pixels", action="store_true", help="also decode every case (serial) while indexing")
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    rows: list[tuple[str, str]] = []
    identical = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "scans"
        start = time.perf_counter()
        generate(root, args.n, args.slices)
        rows.append(("generate DICOMs", f"{args.n} files (CT_small/MR_small copies) in {time.perf_counter() - start:.1f} s"))
        cfg = DataConfig(verify_pixels=args.verify_pixels)
        reference: Path | None = None
        base_s = None
        for workers in counts:
            times = []
            for rep in range(args.repeat):
                out = Path(tmp) / f"out-{workers}-{rep}"
                start = time.perf_counter()
                manifest = index_scans(root, config=cfg, out_dir=out, require_labels=False, workers=workers)
                times.append(time.perf_counter() - start)
                if reference is None:
                    reference = out
                else:
                    same = all((reference / f).read_bytes() == (out / f).read_bytes() for f in OUTPUTS)
                    identical &= same
            best = min(times)
            base_s = base_s or best
            shown = ", ".join(f"{t:.2f}" for t in times)
            rows.append((f"{workers} worker(s)", f"{args.n / best:8.0f} files/s  ({best:.2f} s; runs {shown} s; "
                                                 f"{len(manifest)} cases)  x{base_s / best:.2f} vs {counts[0]}"))
        rows.append(("outputs identical", f"{identical}  ({', '.join(OUTPUTS)})"))
    width = max(len(k) for k, _ in rows)
    print(f"index benchmark: n={args.n}, pixel check {'on' if args.verify_pixels else 'off'}, pool from "
          f"{PARALLEL_MIN_FILES} files")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
