"""Item 4: bad inputs. Every file of pydicom's own test corpus and of a set of generated nasties is either used
(it is in the manifest and decodes to a finite image in [0, 1]) or quarantined with a reason; an unknown file
that does not even look like an image is ignored, as discovery documents. Hostile labels CSVs are refused with
one line naming the row. The CLI never shows a traceback, and nothing outside the data folder is ever read
because a CSV (labels.csv or a run's manifest.csv) or a symlink said so (an audit hook watches every open).
tests/data/test_discovery.py covers single cases of these in-process.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medtransfer.errors import ManifestError
from tests.factories import chest_like, write_dicom, write_nifti, write_png
from tests.reliability.conftest import assert_ok, assert_user_error, cli

posix_only = pytest.mark.skipif(os.name != "posix", reason="symlinks and non-UTF-8 file names need POSIX")


# -- watching for reads outside the data folder ----------------------------------------------------------------
_WATCHED: list[tuple[str, list[str]]] = []  # (folder, paths opened inside it) while a test watches
_IN_HOOK = False


def _audit(event: str, args: tuple) -> None:
    global _IN_HOOK
    if not _WATCHED or _IN_HOOK or event not in ("open", "os.listdir", "os.scandir"):
        return
    _IN_HOOK = True
    try:
        target = args[0] if args else None
        if isinstance(target, (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(target))
            for folder, hits in _WATCHED:
                if real == folder or real.startswith(folder + os.sep):
                    hits.append(real)
    finally:
        _IN_HOOK = False


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one is idle unless a test watches a folder


@pytest.fixture()
def outside(tmp_path: Path) -> Iterator[Path]:
    """A folder beside the data folder holding a valid scan; the test fails if anything in it is opened."""
    folder = tmp_path / "outside"
    write_dicom(folder / "secret.dcm", chest_like(32, seed=99), patient_id="SECRET")
    hits: list[str] = []
    _WATCHED.append((os.path.realpath(folder), hits))
    try:
        yield folder
    finally:
        _WATCHED.pop()
    assert hits == [], f"read outside the data folder: {sorted(set(hits))}"


def _good(root: Path, n: int = 4) -> None:
    for label in ("a", "b"):
        for i in range(n):
            write_dicom(root / label / f"good{i}.dcm", chest_like(32, seed=i + (100 if label == "b" else 0)),
                        patient_id=f"P{label}{i}")


def _accounting(data: Path, out: Path) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """(paths used by the manifest, {quarantined path: (problem, reason)}) from an index output folder."""
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    used = set()
    for row in rows:
        used |= set(filter(None, row["files"].split(";"))) if row["files"] else {row["path"]}
    with open(out / "quarantine.csv", newline="", encoding="utf-8") as fh:
        quarantined = {r["path"]: (r["problem"], r["reason"]) for r in csv.DictReader(fh)}
    return used, quarantined


def _assert_used_cases_decode(data: Path, out: Path) -> int:
    """Every manifest case decodes to a finite float32 image in [0, 1] whose dimensions match ``frames``."""
    from medtransfer.data.loading import load_case
    from medtransfer.data.spec import InputSpec

    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        files = [data / f for f in row["files"].split(";")] if row["files"] else data / row["path"]
        array = load_case(files, row["format"], InputSpec())
        assert array.dtype == np.float32 and np.isfinite(array).all(), row["path"]
        assert 0.0 <= array.min() and array.max() <= 1.0 and array.max() > array.min(), row["path"]
        assert array.ndim - 1 == (3 if int(float(row["frames"] or 1)) > 1 else 2), (row["path"], array.shape)
    return len(rows)


# -- pydicom's test corpus ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pydicom's bundled test files as class a/, its character-set files as class b/ (about 190 files)."""
    import pydicom.data

    src = Path(pydicom.data.__file__).parent
    data = tmp_path_factory.mktemp("corpus") / "data"
    shutil.copytree(src / "test_files", data / "a")
    shutil.copytree(src / "charset_files", data / "b")
    return data


def _is_dicomdir(path: Path) -> bool:
    """A DICOMDIR (media directory) under another name: an index of files, not a scan; discovery skips it."""
    import pydicom

    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
    except Exception:  # noqa: BLE001 - not DICOM at all
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10"


def test_the_pydicom_corpus_is_used_or_quarantined_with_a_reason(corpus: Path, tmp_path: Path) -> None:
    from medtransfer.data.discovery import IMAGE_SUFFIXES, SKIP_SUFFIXES, scan_suffix
    from medtransfer.data.loading import sniff_format

    out = tmp_path / "index"
    assert_ok(cli("--quiet", "index", corpus, "--out", out))
    used, quarantined = _accounting(corpus, out)
    assert not used & set(quarantined)
    assert all(problem and reason for problem, reason in quarantined.values())
    files = [p for p in corpus.rglob("*") if p.is_file()]
    assert len(files) > 150
    for path in files:
        rel = path.relative_to(corpus).as_posix()
        if rel in used or rel in quarantined:
            continue
        # the rest must be what discovery ignores by rule: text/tables/archives, DICOMDIRs, and unknown files
        # that neither look like an image by name nor are one by content
        ignored = (scan_suffix(path.name) in SKIP_SUFFIXES or path.name.upper() == "DICOMDIR" or _is_dicomdir(path)
                   or (scan_suffix(path.name) not in IMAGE_SUFFIXES and sniff_format(path) is None))
        assert ignored, f"{rel}: neither used, quarantined nor ignored by rule"
    assert _assert_used_cases_decode(corpus, out) >= 40


@pytest.mark.slow
def test_training_on_the_pydicom_corpus_quarantines_what_a_2d_model_cannot_use(corpus: Path,
                                                                               tmp_path: Path) -> None:
    """Multi-frame files and series are volumes: a 2D run quarantines them (problem 'dims') instead of
    stopping mid-epoch; a last training batch of one image does not stop BatchNorm."""
    run = tmp_path / "run"
    proc = cli("--quiet", "train", corpus, "--out", run, "--set", "input.size=[32, 32]", "--set", "train.epochs=1",
               "--set", "train.strategy=fine-tune", "--set", "train.batch_size=8")
    assert_ok(proc)
    used, quarantined = _accounting(corpus, run)
    assert {p for p, (problem, _) in quarantined.items() if problem == "dims"}, quarantined
    assert (run / "model.safetensors").is_file()


# -- generated nasties ------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _chunk(b"IEND", b""))


def _nifti_declaring(dims: tuple[int, ...]) -> bytes:
    import nibabel as nib

    raw = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.float32), np.eye(4)).to_bytes())
    raw[40:56] = struct.pack("<8h", len(dims), *dims, *([1] * (7 - len(dims))))
    return bytes(raw)


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


#: file (in class a/) -> "used", "ignored" or the quarantine problem expected
EXPECTED = {
    "trunc.dcm": "truncated", "trunc.png": "pixels", "trunc.nii": "pixels", "trunc.nii.gz": "pixels",
    "zero.dcm": "empty", "zero.png": "empty", "zero.nii.gz": "empty", "zero": "ignored",
    "png_named.dcm": "used", "dicom_named.png": "used", "text_named.dcm": "not_image", "nifti_named.dcm": "unreadable",
    "no_pixel_data.dcm": "no_pixels", "pixel_length_2gb.dcm": "truncated", "rows_65535_frames_1000.dcm": "too_large",
    "one_by_one.dcm": "pixels", "one_by_one.png": "pixels", "one_by_one.nii.gz": "pixels",
    "some_nan_inf.nii.gz": "used", "all_nan.nii.gz": "pixels", "all_inf.nii.gz": "pixels", "four_d.nii.gz": "pixels",
    "declares_30000_cubed.nii": "too_large", "declares_30000_cubed.nii.gz": "too_large",
    "declares_20000_squared.nii.gz": "pixels", "declares_100000_squared.png": "unreadable",
    "declares_12000_squared.png": "pixels", "link_outside.dcm": "outside", "caf\udce9.dcm": "bad_name",
}


def make_nasties(data: Path, outside: Path) -> None:
    import pydicom

    _good(data)
    a = data / "a"
    _cut(write_dicom(a / "trunc.dcm", chest_like(32, seed=9)))
    _cut(write_png(a / "trunc.png", (chest_like(32, seed=9) // 16).astype(np.uint8)))
    _cut(write_nifti(a / "trunc.nii", np.random.default_rng(0).random((32, 32, 4), dtype=np.float32)))
    _cut(write_nifti(a / "trunc.nii.gz", np.random.default_rng(1).random((32, 32, 4), dtype=np.float32)))
    for name in ("zero.dcm", "zero.png", "zero.nii.gz", "zero"):
        (a / name).write_bytes(b"")
    write_png(a / "x.png", (chest_like(32, seed=3) // 16).astype(np.uint8)).rename(a / "png_named.dcm")
    write_dicom(a / "x.dcm", chest_like(32, seed=4), patient_id="Pw").rename(a / "dicom_named.png")
    (a / "text_named.dcm").write_text("hello world\n" * 20)
    write_nifti(a / "x.nii", np.random.default_rng(2).random((32, 32), dtype=np.float32)).rename(a / "nifti_named.dcm")
    path = write_dicom(a / "no_pixel_data.dcm", chest_like(32, seed=5), patient_id="Pn")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    raw = bytearray(write_dicom(a / "pixel_length_2gb.dcm", chest_like(32, seed=6), patient_id="Pb").read_bytes())
    at = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) OW: the 4-byte length sits 8 bytes in
    raw[at + 8:at + 12] = struct.pack("<I", 0x7FFFFFF0)
    (a / "pixel_length_2gb.dcm").write_bytes(bytes(raw))
    path = write_dicom(a / "rows_65535_frames_1000.dcm", chest_like(32, seed=7), patient_id="Ph")
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    ds.save_as(path)
    write_dicom(a / "one_by_one.dcm", np.array([[7]], dtype=np.uint16), patient_id="P1")
    write_png(a / "one_by_one.png", np.array([[7]], dtype=np.uint8))
    write_nifti(a / "one_by_one.nii.gz", np.ones((1, 1, 1), dtype=np.float32))
    volume = np.random.default_rng(3).random((32, 32), dtype=np.float32)
    volume[3:5, 3:5], volume[10, 10], volume[11, 11] = np.nan, np.inf, -np.inf
    write_nifti(a / "some_nan_inf.nii.gz", volume)
    write_nifti(a / "all_nan.nii.gz", np.full((32, 32), np.nan, dtype=np.float32))
    write_nifti(a / "all_inf.nii.gz", np.full((32, 32), np.inf, dtype=np.float32))
    write_nifti(a / "four_d.nii.gz", np.random.default_rng(4).random((8, 8, 4, 3), dtype=np.float32))
    (a / "declares_30000_cubed.nii").write_bytes(_nifti_declaring((30000, 30000, 30000)))
    (a / "declares_30000_cubed.nii.gz").write_bytes(gzip.compress(_nifti_declaring((30000, 30000, 30000))))
    (a / "declares_20000_squared.nii.gz").write_bytes(gzip.compress(_nifti_declaring((20000, 20000))))
    (a / "declares_100000_squared.png").write_bytes(_png_declaring(100000, 100000))
    (a / "declares_12000_squared.png").write_bytes(_png_declaring(12000, 12000))
    os.symlink("..", a / "loop_to_parent")
    os.symlink("loop_b", a / "loop_a")
    os.symlink("loop_a", a / "loop_b")
    os.symlink(outside / "secret.dcm", a / "link_outside.dcm")
    os.symlink(outside, a / "dir_link_outside")
    write_dicom(Path(os.fsdecode(os.fsencode(a) + b"/caf\xe9.dcm")), chest_like(32, seed=11), patient_id="Pc")


@posix_only
def test_generated_nasties_are_used_or_quarantined_with_a_reason(tmp_path: Path, outside: Path) -> None:
    data = tmp_path / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom/nibabel warn about the nonsense we write on purpose
        make_nasties(data, outside)
    out = tmp_path / "index"
    proc = cli("--quiet", "index", data, "--out", out)
    assert_ok(proc)
    used, quarantined = _accounting(data, out)
    got = {}
    for name in EXPECTED:
        shown = ("a/" + name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        got[name] = ("used" if "a/" + name in used else quarantined[shown][0] if shown in quarantined
                     else "ignored")
    assert got == EXPECTED
    assert {f"a/good{i}.dcm" for i in range(4)} <= used
    assert all(reason for _, reason in quarantined.values())
    assert str(tmp_path) not in (out / "quarantine.csv").read_text(encoding="utf-8")  # no absolute paths
    assert "symlink(s) were not followed" in (out / "summary.json").read_text(encoding="utf-8")
    _assert_used_cases_decode(data, out)


# -- hostile labels CSVs ------------------------------------------------------------------------------------------
HOSTILE_CSVS = {
    "not UTF-8": ("path,label\na/caf\xe9.dcm,a\n".encode("latin-1"), "not UTF-8"),
    "traversal": (b"path,label\n../../etc/passwd,a\na/good1.dcm,b\n", "outside the data folder"),
    "absolute": (b"path,label\n/etc/passwd,a\na/good1.dcm,b\n", "outside the data folder"),
    "traversal to a scan": (b"path,label\na/../../outside/secret.dcm,a\na/good1.dcm,b\n", "outside the data folder"),
    "backslashes": (b"path,label\n..\\outside\\secret.dcm,a\na/good1.dcm,b\n", "outside the data folder"),
    "symlink out": (b"path,label\na/link_outside.dcm,a\na/good1.dcm,b\n", "outside the data folder"),
    "NUL byte": (b'path,label\n"a/good0\x00.dcm",a\na/good1.dcm,b\n', "control character"),
    "rich markup": (b"path,label\n[/bold]x.dcm,a\na/good1.dcm,b\n", "[/bold]x.dcm"),
    "line break": (b'path,label\n"a/go\nod0.dcm",a\na/good1.dcm,b\n', "control character"),
}


@pytest.fixture()
def labelled(tmp_path: Path, outside: Path) -> Path:
    data = tmp_path / "data"
    _good(data)
    if os.name == "posix":
        os.symlink(outside / "secret.dcm", data / "a" / "link_outside.dcm")
    return data


@pytest.mark.parametrize("kind", list(HOSTILE_CSVS))
def test_a_hostile_labels_csv_is_refused_naming_the_row(labelled: Path, tmp_path: Path, kind: str) -> None:
    from medtransfer.data.discovery import index_scans

    content, needle = HOSTILE_CSVS[kind]
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    with pytest.raises(ManifestError, match="row 1") as info:
        index_scans(labelled, labels=labels)
    assert needle.lower() in str(info.value).lower()


@pytest.mark.parametrize("kind", ["not UTF-8", "traversal", "NUL byte", "rich markup"])
def test_the_cli_refuses_a_hostile_labels_csv_in_one_line(labelled: Path, tmp_path: Path, kind: str) -> None:
    content, needle = HOSTILE_CSVS[kind]
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    assert_user_error(cli("--quiet", "index", labelled, "--labels", labels, "--out", tmp_path / "out"),
                      "ManifestError", "row 1", needle)


def test_markup_in_class_and_site_names_is_printed_not_interpreted(tmp_path: Path) -> None:
    """Class names come from folders or the CSV, sites from InstitutionName: the summary prints them as text."""
    data = tmp_path / "data"
    for label in ("[red]x", "b"):  # a folder name cannot hold "/": an opening tag would silently vanish
        for i in range(3):
            write_dicom(data / label / f"s{i}.dcm", chest_like(32, seed=i + len(label)), patient_id=f"P{label}{i}",
                        institution="[/bold] site")
    proc = cli("index", data, "--out", tmp_path / "out")
    assert_ok(proc)
    assert "[red]x" in proc.stdout and "[/bold] site" in proc.stdout


@posix_only
def test_a_tampered_run_manifest_cannot_make_evaluation_read_outside(tmp_path: Path, outside: Path) -> None:
    """manifest.csv is a CSV too: a path edited to climb out of the data folder is refused before any read."""
    from medtransfer.data.dataset import ScanDataset
    from medtransfer.data.discovery import index_scans
    from medtransfer.data.manifest import Manifest
    from medtransfer.data.spec import InputSpec

    data = tmp_path / "data"
    _good(data)
    index_scans(data, out_dir=tmp_path / "index")
    csv_path = tmp_path / "index" / "manifest.csv"
    rows = list(csv.DictReader(csv_path.open(newline="", encoding="utf-8")))
    for row, evil in zip(rows, ("../outside/secret.dcm", str(outside / "secret.dcm")), strict=False):
        row["path"] = evil
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    manifest = Manifest.load(tmp_path / "index")
    ds = ScanDataset(manifest, InputSpec(size=(32, 32)))
    for i in range(2):
        with pytest.raises(ManifestError, match="outside the data folder"):
            ds[i]
    assert ds[2]["image"].shape == (1, 32, 32)


@posix_only
def test_nothing_outside_the_data_folder_is_read_through_symlinks(tmp_path: Path, outside: Path) -> None:
    from medtransfer.data.dataset import ScanDataset
    from medtransfer.data.discovery import index_scans
    from medtransfer.data.spec import InputSpec

    data = tmp_path / "data"
    _good(data)
    os.symlink(outside / "secret.dcm", data / "a" / "link_outside.dcm")
    os.symlink(outside, data / "b" / "dir_link_outside")
    os.symlink("..", data / "b" / "loop")
    manifest = index_scans(data, out_dir=tmp_path / "index")
    assert "a/link_outside.dcm" in set(manifest.quarantine["path"])
    assert len(manifest) == 8
    ds = ScanDataset(manifest, InputSpec(size=(32, 32)))
    assert all(ds[i]["image"].shape == (1, 32, 32) for i in range(len(ds)))
