"""Parallel indexing benchmark: files/s of ``index_scans`` with 1 and N worker processes, same output.

Writes ``--n`` real-looking DICOM files to a temporary folder: copies of pydicom's ``CT_small.dcm`` (CT series
of ``--slices`` slices, positions 2.5 mm apart) and ``MR_small.dcm`` (single images), each with new UIDs and
patient IDs, ten files per patient folder; ``--png K`` adds K small grey PNGs (64x64). Three files whose
headers are fine but whose pixels are not (a DICOM with short PixelData, a PNG with garbage image data, a PNG
cut in half) are always added, so the quarantine is part of the comparison. Everything is in one ``export/``
folder, so the index is an unlabelled inventory (as ``medtransfer index`` of a PACS export).

Then it indexes the folder once per worker count and run, prints files/s and the ratio to the first count, and
checks that ``manifest.csv``, ``quarantine.csv``, ``manifest.json`` and ``summary.json`` are byte-identical to
the first run's (exit status 1 if not). Default arm: headers only (``data.verify_pixels=false``). ``--pixels``:
the pixel check too (every case decoded once, in the pool as well), with the time of each stage (headers,
pixels) and the pixel check's files/s on its own.

The first parallel run of a process includes starting the fork server (~1 s; ~5 s with ``--pixels``, when the
server also imports torch and MONAI for the pixel workers); ``--repeat 2`` shows the warm figure as well.
``--pool-cost`` measures, in fresh processes, what starting a pixel-checking pool costs with and without the
decoder preloaded in the fork server: seconds, and memory per worker (RSS, PSS, private) from /proc.

Usage: python benchmarks/index_parallel.py [--n 3000] [--png 0] [--workers 1,2] [--slices 40] [--repeat 1]
       [--pixels] [--pool-cost]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medtransfer.config import DataConfig  # noqa: E402
from medtransfer.data import discovery  # noqa: E402
from medtransfer.data.discovery import PARALLEL_MIN_FILES, index_scans  # noqa: E402

OUTPUTS = ("manifest.csv", "quarantine.csv", "manifest.json", "summary.json")
CORRUPT = 3  # files with bad pixels that pass the header step


def generate(root: Path, n: int, slices: int, png: int = 0) -> None:
    """Write ``n`` DICOM files (two thirds CT series of ``slices`` slices, one third single MR images), ``png``
    PNG files and the :data:`CORRUPT` files."""
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
    _pngs(root, png)
    _corrupt(root, mr)


def _save(template: Any, path: Path, patient: str, study: str, series: str, *, z: float | None,
          instance: int) -> None:
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


def _pngs(root: Path, n: int) -> None:
    """``n`` 64x64 8-bit grey PNGs (a smooth gradient plus noise), ten per folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.float64)
    for i in range(n):
        img = np.clip(ramp + rng.normal(0, 8, ramp.shape), 0, 255).astype(np.uint8)
        path = root / "png" / f"g{i // 10:05d}" / f"img-{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def _corrupt(root: Path, mr: Any) -> None:
    """The :data:`CORRUPT` files: headers that pass, pixels that do not decode."""
    import pydicom
    from pydicom.uid import generate_uid

    short = root / "corrupt" / "short.dcm"
    _save(mr, short, "BENCHBAD", generate_uid(), generate_uid(), z=None, instance=1)
    ds = pydicom.dcmread(short)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(short)
    _pngs(root / "corrupt", 2)
    junk, cut = sorted((root / "corrupt" / "png").rglob("*.png"))
    data = junk.read_bytes()
    start = data.index(b"IDAT") + 4
    junk.write_bytes(data[:start] + bytes((7 + k) % 256 for k in range(len(data) - start - 12)) + data[-12:])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])


def _timed(stages: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[name] = time.perf_counter() - start
    return wrapper


def pool_cost(preload: bool) -> str:
    """In this (fresh) process: a 2-process header pool (whose fork server preloads the decoder or not), then a
    2-process pixel pool; seconds for each and memory per process after a few decodes."""
    from concurrent.futures import ProcessPoolExecutor

    from pydicom.data import get_testdata_file

    from medtransfer.data.discovery import check_pixels_chunk, init_pixel_worker
    from medtransfer.data.headers import read_header_chunk

    f = Path(get_testdata_file("MR_small.dcm"))
    names = discovery._HEADER_PRELOAD + (discovery._PIXEL_PRELOAD if preload else ())
    start = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=discovery._pool_context(names)) as pool:
        list(pool.map(read_header_chunk, [[("x", f, f.stat().st_size, True)]] * 2))
    t_head = time.perf_counter() - start
    start = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=discovery._pool_context(discovery._PIXEL_PRELOAD),
                             initializer=init_pixel_worker) as pool:
        list(pool.map(check_pixels_chunk, [[(f, "dicom")]] * 2))
        t_pix = time.perf_counter() - start
        list(pool.map(check_pixels_chunk, [[(f, "dicom")] * 100] * 2))
        workers = [_memory(pid) for pid in pool._processes]  # noqa: SLF001 - the pool's own worker ids
        server = [_memory(pid) for pid in _children(os.getpid()) if pid not in pool._processes]  # noqa: SLF001
    mb = max(server, key=lambda m: m[0]) if server else (0, 0, 0)
    shown = "; ".join(f"RSS {r:.0f} MB, PSS {p:.0f} MB, private {u:.0f} MB" for r, p, u in workers)
    return (f"preload {'on ' if preload else 'off'}: header pool {t_head:.1f} s, then pixel pool {t_pix:.1f} s; "
            f"fork server RSS {mb[0]:.0f} MB (private {mb[2]:.0f} MB); workers: {shown}")


def _memory(pid: int) -> tuple[float, float, float]:
    """(RSS, PSS, private) in MB from /proc/PID/smaps_rollup (zeros where it cannot be read)."""
    kb: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key, *rest = line.split()
                if rest and rest[-1] == "kB":
                    kb[key.rstrip(":")] = int(rest[0])
    except OSError:
        pass
    return kb.get("Rss", 0) / 1024, kb.get("Pss", 0) / 1024, (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="number of DICOM files (2,000+ for the issue's check)")
    p.add_argument("--png", type=int, default=0, help="number of PNG files to add")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts; the first is the reference")
    p.add_argument("--slices", type=int, default=40, help="slices per CT series")
    p.add_argument("--repeat", type=int, default=1, help="runs per worker count (the fastest is reported)")
    p.add_argument("--pixels", "--verify-pixels", action="store_true", help="the pixel check too (in the pool)")
    p.add_argument("--pool-cost", action="store_true", help="measure a pixel pool's start-up and memory, and exit")
    p.add_argument("--pool-cost-child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pool_cost_child:
        print(pool_cost(args.pool_cost_child == "on"))
        return 0
    if args.pool_cost:
        for mode in ("off", "on"):  # each in a fresh process: one fork server per process, preload fixed at start
            subprocess.run([sys.executable, __file__, "--pool-cost-child", mode], check=True)
        return 0
    counts = [int(w) for w in args.workers.split(",")]
    stages: dict[str, float] = {}
    discovery._read_headers = _timed(stages, "headers", discovery._read_headers)  # noqa: SLF001
    discovery._verify_pixels = _timed(stages, "pixels", discovery._verify_pixels)  # noqa: SLF001

    rows: list[tuple[str, str]] = []
    identical = True
    files = args.n + args.png + CORRUPT
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "scans"
        start = time.perf_counter()
        generate(root / "export", args.n, args.slices, args.png)
        rows.append(("generate files", f"{files} files ({args.n} DICOM, {args.png} PNG, {CORRUPT} corrupt) in "
                                       f"{time.perf_counter() - start:.1f} s"))
        cfg = DataConfig(verify_pixels=args.pixels)
        reference: Path | None = None
        base_s = None
        for workers in counts:
            runs: list[tuple[float, dict[str, float]]] = []
            for rep in range(args.repeat):
                out = Path(tmp) / f"out-{workers}-{rep}"
                stages.clear()
                start = time.perf_counter()
                manifest = index_scans(root, config=cfg, out_dir=out, require_labels=False, workers=workers)
                runs.append((time.perf_counter() - start, dict(stages)))
                if reference is None:
                    reference = out
                else:
                    identical &= all((reference / f).read_bytes() == (out / f).read_bytes() for f in OUTPUTS)
            best, best_stages = min(runs, key=lambda r: r[0])
            base_s = base_s or best
            shown = ", ".join(f"{t:.2f}" for t, _ in runs)
            rows.append((f"{workers} worker(s)", f"{files / best:8.0f} files/s  ({best:.2f} s; runs {shown} s; "
                                                 f"{len(manifest)} cases, {len(manifest.quarantine)} quarantined)"
                                                 f"  x{base_s / best:.2f} vs {counts[0]}"))
            if args.pixels:
                h, px = best_stages.get("headers", 0.0), best_stages.get("pixels", 0.0)
                rows.append(("", f"headers {h:.2f} s, pixel check {px:.2f} s ({files / max(px, 1e-9):.0f} files/s)"))
        rows.append(("outputs identical", f"{identical}  ({', '.join(OUTPUTS)})"))
    width = max(len(k) for k, _ in rows)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"index benchmark: {files} files, pixel check {'on' if args.pixels else 'off'}, pool from "
          f"{PARALLEL_MIN_FILES} files, {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
