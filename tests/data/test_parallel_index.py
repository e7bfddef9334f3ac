"""Parallel header reading and pixel checking in ``index_scans``: the same bytes as one worker, the threshold,
the fallbacks."""

from __future__ import annotations

import logging
import multiprocessing
import os
import types
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medtransfer import progress as prog
from medtransfer.config import DataConfig
from medtransfer.data import discovery
from medtransfer.data.discovery import check_pixels_chunk, index_scans, index_workers
from medtransfer.data.headers import HeaderProblem, read_header_chunk
from medtransfer.errors import ConfigError, ScanReadError
from tests.factories import chest_like, write_dicom, write_nifti, write_png

FAST = DataConfig(verify_pixels=False)
OUTPUTS = ("manifest.csv", "quarantine.csv", "manifest.json", "summary.json")
N_DICOM = 1200
BAD = {"a/bad.dcm": "not_image", "b/empty.png": "empty", "b/IM-cut.dcm": "truncated"}


def _folder(root: Path, n_dicom: int, *, bad: bool = True) -> Path:
    """``n_dicom`` tiny radiographs in two class folders (3 images per patient), a 5-slice CT series, PNG and
    NIfTI files, the corrupt files of ``BAD`` (unless ``bad`` is False) and files that are not scans."""
    img = chest_like(16)
    for i in range(n_dicom):
        write_dicom(root / ("a" if i % 2 else "b") / f"p{i // 6:04d}" / f"IM{i:05d}.dcm", img,
                    patient_id=f"P{i // 3:05d}", sex="MF"[i % 2], age=f"{20 + i % 60:03d}Y")
    uid, study = generate_uid(), generate_uid()
    for k in range(5):
        write_dicom(root / "a" / "ct" / f"s{k}.dcm", chest_like(16, seed=k, dtype=np.int16), modality="CT",
                    series_uid=uid, study_uid=study, position=(0.0, 0.0, float(k)), instance=k + 1,
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), patient_id="PCT")
    for k in range(2):
        write_png(root / "a" / f"x{k}.png", chest_like(16, seed=k, dtype=np.uint8, max_value=255))
        write_nifti(root / "b" / f"v{k}.nii.gz", np.zeros((8, 8, 8), np.float32))
    if bad:
        (root / "a" / "bad.dcm").write_bytes(os.urandom(600))
        (root / "b" / "empty.png").write_bytes(b"")
        cut = write_dicom(root / "b" / "IM-cut.dcm", chest_like(16))
        cut.write_bytes(cut.read_bytes()[:-200])
    (root / "notes.txt").write_text("not a scan")
    (root / "b" / "README").write_bytes(b"plain text, no extension: not a scan")
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("big"), N_DICOM)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("small"), 120)  # 134 candidates: 3 chunks of 64


@pytest.fixture(scope="module")
def one_worker(big: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one")
    index_scans(big, config=FAST, out_dir=out, workers=1)
    return out


def _same_bytes(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_workers_write_the_same_bytes_as_one(big, one_worker, tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setenv("TTY_INTERACTIVE", "0")  # stderr is not a terminal here: timed plain lines
    monkeypatch.setenv(prog.INTERVAL_ENV, "0.5")
    assert index_workers(None) >= 1
    with caplog.at_level(logging.INFO, logger="medtransfer.data.discovery"):
        m = index_scans(big, config=FAST, out_dir=tmp_path, workers=2, progress=True)
    assert "with 2 processes" in caplog.text  # the pool did the reading
    _same_bytes(one_worker, tmp_path)
    assert len(m) == N_DICOM + 1 + 2 + 2  # radiographs, one CT volume, PNGs, NIfTIs
    assert dict(zip(m.quarantine["path"], m.quarantine["problem"], strict=True)) == BAD
    assert m.df.loc[m.df["path"] == "a/ct", "frames"].item() == 5
    lines = capsys.readouterr().err.splitlines()
    total = N_DICOM + 5 + 4 + 3 + 1  # candidates: every file but notes.txt
    assert f"reading headers: 0/{total} files, 0%, elapsed 0:00, ETA unknown, 2 processes" in lines
    assert any(ln.startswith(f"reading headers: {total}/{total} files, 100%") and ln.endswith("done, 2 processes")
               for ln in lines), lines


def test_strict_mode_stops_at_the_same_file_with_a_pool(big):
    errors = []
    for workers in (1, 2):
        with pytest.raises(ScanReadError) as info:
            index_scans(big, config=FAST, strict=True, workers=workers)
        errors.append((info.value.path, info.value.reason))
    assert errors[0] == errors[1]
    assert errors[0][0] == "b/IM-cut.dcm"  # the first bad file in the walk's order (it lists b/ before a/)


def _dying_reader(chunk):
    """Kills the worker process that reads the chunk holding the first radiograph (a segfault, an OOM kill)."""
    if multiprocessing.parent_process() is not None and any(rel.endswith("IM00000.dcm") for rel, *_ in chunk):
        os._exit(3)
    return read_header_chunk(chunk)


def test_a_dead_worker_falls_back_to_reading_here(big, one_worker, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(discovery, "read_header_chunk", _dying_reader)
    with caplog.at_level(logging.INFO, logger="medtransfer.data.discovery"):
        index_scans(big, config=FAST, out_dir=tmp_path, workers=2)
    assert "with 2 processes" in caplog.text
    assert caplog.text.count("a header-reading process died") == 1
    _same_bytes(one_worker, tmp_path)


class _NoPool:
    def __init__(self, *args, **kwargs):
        raise AssertionError("no process pool below the threshold")


def test_small_folders_stay_in_process_and_the_threshold_switches(small, tmp_path, caplog, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(discovery, "ProcessPoolExecutor", _NoPool)
        index_scans(small, config=FAST, out_dir=tmp_path / "one", workers=4)
    monkeypatch.setattr(discovery, "PARALLEL_MIN_FILES", 10)
    with caplog.at_level(logging.INFO, logger="medtransfer.data.discovery"):
        index_scans(small, config=FAST, out_dir=tmp_path / "two", workers=2)
    assert "with 2 processes (chunks of 64 files)" in caplog.text
    _same_bytes(tmp_path / "one", tmp_path / "two")


def test_pool_size_rules(monkeypatch):
    n = discovery.PARALLEL_MIN_FILES
    assert discovery._pool_size(n - 1, 8) == 1
    assert discovery._pool_size(n, 1) == 1
    assert discovery._pool_size(n, 4) == 4
    assert discovery._pool_size(n, 64) == -(-n // 64)  # no more processes than chunks
    monkeypatch.setattr(discovery.multiprocessing, "current_process", lambda: types.SimpleNamespace(daemon=True))
    assert discovery._pool_size(100 * n, 8) == 1  # a DataLoader worker may not start processes
    assert [discovery._chunk_size(k, 2) for k in (1000, 1200, 3000, 100_000)] == [125, 150, 256, 256]
    assert discovery._chunk_size(1000, 8) == 64


def test_index_workers(monkeypatch):
    assert index_workers(3) == 3
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ConfigError, match="at least 1"):
            index_workers(bad)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(discovery, "usable_cpus", lambda: 32)
    assert index_workers() == discovery.MAX_AUTO_WORKERS == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert index_workers() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "lots")
    assert index_workers() == 8
    monkeypatch.setattr(discovery, "usable_cpus", lambda: 2)
    assert index_workers() == 2


def test_header_problems_survive_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(HeaderProblem("a/b.dcm", "truncated: copy it again", "truncated")))
    assert (type(exc), exc.path, exc.reason, exc.problem) == (HeaderProblem, "a/b.dcm", "truncated: copy it again",
                                                              "truncated")


def test_cli_workers_flag(small, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medtransfer.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["--quiet", "index", str(small), "--out", str(tmp_path / "x"), "--workers", "0"])
    assert refused.exit_code == 2 and not (tmp_path / "x").exists()
    calls = []
    monkeypatch.setattr(discovery, "_pool_size", lambda n, workers: calls.append(workers) or 1)
    for workers in ("1", "3"):
        done = runner.invoke(app, ["--quiet", "index", str(small), "--out", str(tmp_path / workers), "--workers",
                                   workers, "--set", "data.verify_pixels=false"])
        assert done.exit_code == 0, done.output
    assert calls == [1, 3]  # the flag reaches the header reader


# --- the pixel check (data.verify_pixels) -------------------------------------------------------------------------

CHECKED = DataConfig(verify_pixels=True)
#: Files that pass the header step but not decoding (problem "pixels"), and 3D cases refused for a 2D model.
BAD_PIXELS = {"a/short.dcm", "b/junk.png", "b/cut.png", "a/flat.dcm", "b/ct-bad", "b/v0.nii.gz", "b/v1.nii.gz"}
NOT_2D = {"a/ct"}


def _corrupt_pixels(root: Path) -> Path:
    """Add cases whose headers are fine and whose pixels are not: PixelData shorter than Rows x Columns (its
    element length agrees with the file, so the header check passes), a PNG whose image data is garbage after
    a valid header, a PNG cut in half, a constant image, and a CT series with one such short slice."""
    short = write_dicom(root / "a" / "short.dcm", chest_like(16))
    ds = pydicom.dcmread(short)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(short)
    junk = write_png(root / "b" / "junk.png", chest_like(16, dtype=np.uint8, max_value=255))
    data = junk.read_bytes()
    start = data.index(b"IDAT") + 4
    junk.write_bytes(data[:start] + bytes(range(7, 7 + len(data) - start - 12)) + data[-12:])
    cut = write_png(root / "b" / "cut.png", chest_like(32, dtype=np.uint8, max_value=255))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    write_dicom(root / "a" / "flat.dcm", np.full((16, 16), 7, np.uint16))
    uid = generate_uid()
    for k in range(4):
        path = write_dicom(root / "b" / "ct-bad" / f"s{k}.dcm", chest_like(16, seed=k, dtype=np.int16),
                           modality="CT", series_uid=uid, position=(0.0, 0.0, float(k)), instance=k + 1,
                           orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), patient_id="PCT2")
        if k == 2:
            ds = pydicom.dcmread(path)
            ds.PixelData = ds.PixelData[:64]
            ds.save_as(path)
    return root


@pytest.fixture(scope="module")
def pixels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pixel-check folder; the process's fork server is stopped first, so the next header pool starts one
    that preloads the decoder, as in a fresh ``medtransfer index`` (the header tests above start theirs without
    it, and a pixel pool from that server would import torch in each worker: ~9 s per pool instead of 0.1 s)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's hook for its own tests
    if stop is not None:
        stop()
    return _corrupt_pixels(_folder(tmp_path_factory.mktemp("pixels"), 120, bad=False))


@pytest.fixture(scope="module")
def pixels_one_worker(pixels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pixels-one")
    index_scans(pixels, config=CHECKED, out_dir=out, workers=1, spatial_dims=2)
    return out


def test_pixel_check_with_a_pool_writes_the_same_bytes(pixels, pixels_one_worker, tmp_path, caplog, capsys,
                                                       monkeypatch):
    monkeypatch.setattr(discovery, "PARALLEL_MIN_FILES", 10)
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    monkeypatch.setenv(prog.INTERVAL_ENV, "0.5")
    with caplog.at_level(logging.INFO, logger="medtransfer.data.discovery"):
        m = index_scans(pixels, config=CHECKED, out_dir=tmp_path, workers=2, spatial_dims=2, progress=True)
    cases = 120 + 2 + 2 + 1 + 4 + 1  # radiographs, PNGs, NIfTIs (all zeros), CT, corrupt single files, bad series
    files = cases - 2 + 5 + 4  # the series count their slices
    assert f"checking the pixels of {cases} cases ({files} files) with 2 processes" in caplog.text
    _same_bytes(pixels_one_worker, tmp_path)
    problems = dict(zip(m.quarantine["path"], m.quarantine["problem"], strict=True))
    assert {p for p, kind in problems.items() if kind == "pixels"} == BAD_PIXELS
    assert {p for p, kind in problems.items() if kind == "dims"} == NOT_2D
    reasons = dict(zip(m.quarantine["path"], m.quarantine["reason"], strict=True))
    assert "needs 512" in reasons["a/short.dcm"] and "truncated" in reasons["b/cut.png"]
    assert "constant" in reasons["b/v0.nii.gz"] and "needs 512" in reasons["b/ct-bad"]
    assert len(m) == cases - len(BAD_PIXELS) - len(NOT_2D)
    lines = capsys.readouterr().err.splitlines()
    assert f"checking pixels: 0/{files} files, 0%, elapsed 0:00, ETA unknown, 2 processes" in lines
    assert any(ln.startswith(f"checking pixels: {files}/{files} files, 100%") for ln in lines), lines


def _dying_checker(chunk):
    """Kills the worker process that decodes the chunk holding the first radiograph."""
    if multiprocessing.parent_process() is not None and any(
            not isinstance(target, list) and target.name == "IM00000.dcm" for target, _ in chunk):
        os._exit(3)
    return check_pixels_chunk(chunk)


def test_a_dead_pixel_worker_falls_back_and_strict_mode_stops_at_the_same_case(pixels, pixels_one_worker, tmp_path,
                                                                               caplog, monkeypatch):
    monkeypatch.setattr(discovery, "PARALLEL_MIN_FILES", 10)
    monkeypatch.setattr(discovery, "check_pixels_chunk", _dying_checker)
    with caplog.at_level(logging.INFO, logger="medtransfer.data.discovery"):
        index_scans(pixels, config=CHECKED, out_dir=tmp_path, workers=2, spatial_dims=2)
    assert "with 2 processes (chunks of ~" in caplog.text
    assert caplog.text.count("a pixel-checking process died") == 1
    _same_bytes(pixels_one_worker, tmp_path)
    errors = []
    for workers in (1, 2):
        with pytest.raises(ScanReadError) as info:
            index_scans(pixels, config=DataConfig(verify_pixels=True, strict=True), workers=workers)
        errors.append((info.value.path, info.value.reason))
    assert errors[0] == errors[1]
    assert errors[0][0] == "a/flat.dcm"  # the first bad case in path order


def test_pixel_chunks_are_whole_cases_of_about_the_chunk_size_in_files():
    cases = [(Path("a.png"), "png"), ([Path("s0"), Path("s1"), Path("s2")], "dicom"), (Path("b.png"), "png"),
             ([Path(f"t{k}") for k in range(9)], "dicom"), (Path("c.png"), "png")]
    weights = [discovery._files_in(c) for c in cases]
    assert weights == [1, 3, 1, 9, 1]
    chunks = discovery._weighted_chunks(cases, weights, 4)
    assert [[cases.index(c) for c in chunk] for chunk in chunks] == [[0, 1], [2], [3], [4]]
    assert [c for chunk in chunks for c in chunk] == cases  # order kept


class _NoProcesses:
    def __init__(self, *args, **kwargs):
        raise OSError("no semaphores here")


def test_without_processes_both_stages_run_here_with_a_warning(pixels, pixels_one_worker, tmp_path, caplog,
                                                               monkeypatch):
    monkeypatch.setattr(discovery, "PARALLEL_MIN_FILES", 10)
    monkeypatch.setattr(discovery, "ProcessPoolExecutor", _NoProcesses)
    with caplog.at_level(logging.WARNING, logger="medtransfer.data.discovery"):
        index_scans(pixels, config=CHECKED, out_dir=tmp_path, workers=2, spatial_dims=2)
    assert "could not start 2 processes to read headers (OSError); the files are read in this process" in caplog.text
    assert "could not start 2 processes to check pixels (OSError); the cases are checked in this process" in caplog.text
    _same_bytes(pixels_one_worker, tmp_path)


def test_indexing_imports_no_torch_until_pixels_are_decoded():
    import subprocess
    import sys

    code = ("import sys; import medtransfer.data.discovery, medtransfer.data.headers; "
            "print(sorted(m for m in ('torch', 'monai', 'medtransfer.data.loading') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # header workers never pay for torch; check_pixels_chunk imports it
