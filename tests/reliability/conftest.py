"""Shared pieces of the reliability and security suite: the CLI in a subprocess, a tiny dataset whose DICOM
headers and file names carry PHI canaries, and one uninterrupted index -> train -> evaluate -> explain ->
report pipeline that the crash, determinism and PHI tests compare against.

Everything runs on the CPU with one intra-op thread per process (``OMP_NUM_THREADS=1``): on two shared cores
that is several times faster than torch's default, and every subprocess computes with the same thread count,
so "same seed, same bytes" comparisons between processes are meaningful.

The pipeline is built once per test session, also under pytest-xdist (a file lock in the session's shared
temporary folder), because every comparison needs the same data folder: the resolved config records it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medtransfer import faults
from tests.factories import CANARY_BIRTH, chest_like, write_dicom

SIZE = 32
N_PER_CLASS = 12
#: A distinctive token in every scan's file name (file names may reach only the documented path columns).
FILE_CANARY = "CANARYFILEZQ"
#: Also in the headers: the institution address and a patient ID per patient.
ADDRESS_CANARY = "1 CANARYSTREET"
PID_CANARY = "CANARYPID"

#: The run configuration of every training in this suite (32 px, 2 epochs, fine-tune with augmentation).
TINY = [
    f"input.size=[{SIZE}, {SIZE}]",
    "train.strategy=fine-tune",
    "train.epochs=2",
    "train.batch_size=8",
    "train.num_workers=0",
    "train.augment.enabled=true",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
]
N_BOOT = "50"


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: test salt, CPU only, one thread, no fault injection unless asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(faults.ENV_PREFIX)}
    env.update(MEDTRANSFER_SALT="test-salt-not-secret", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.update(extra)
    return env


def cli_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "medtransfer.cli", *map(str, args)]


def cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``medtransfer ARGS`` in a subprocess and return it (text output captured)."""
    return subprocess.run(cli_cmd(*args), env=env or cli_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """``train DATA --out OUT`` with the suite's configuration (``extra`` overrides come last)."""
    args = ["--quiet", "train", str(data), "--out", str(out)]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """Exit ``code``, no traceback, and exactly one ``error:`` line on stderr holding every needle."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in out, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def history(run_dir: Path) -> list[dict[str, str]]:
    """history.csv without the timing and ``attempt`` columns (a resumed run's later epochs have attempt 1)."""
    with open(run_dir / "history.csv", newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in ("seconds", "attempt")} for row in csv.DictReader(fh)]


def evaluation_without_timing(path: Path) -> dict:
    """evaluation.json without what differs between identical evaluations: creation times and durations."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    meta = doc.get("meta", {})
    for key in ("created", "timing"):
        meta.pop(key, None)
    meta.get("model", {}).pop("created", None)  # when the model card was written
    return doc


def assert_no_partial_files(root: Path) -> None:
    """Every file under a final name (not ``.tmp-*``) is complete: it parses as what its suffix says."""
    from PIL import Image
    from safetensors import safe_open

    for path in root.rglob("*"):
        if not path.is_file() or path.name.startswith(".tmp-") or "cache" in path.relative_to(root).parts:
            continue
        suffix = path.suffix.lower()
        where = path.relative_to(root)
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".csv":
            text = path.read_text(encoding="utf-8")
            assert text.endswith("\n"), f"{where}: no final newline (cut short?)"
            rows = list(csv.reader(text.splitlines()))
            assert rows and all(len(r) == len(rows[0]) for r in rows), f"{where}: ragged CSV (cut short?)"
        elif suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    fh.get_tensor(key)
        elif suffix == ".png":
            with Image.open(path) as im:
                im.load()
        elif suffix == ".pdf":
            assert path.read_bytes().rstrip().endswith(b"%%EOF"), f"{where}: PDF without %%EOF"
        elif suffix == ".html":
            assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), f"{where}: HTML cut short"
        elif suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text(encoding="utf-8"))


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))


def make_canary_dataset(root: Path, *, n_per_class: int = N_PER_CLASS, size: int = SIZE) -> Path:
    """Class folders normal/ and pneumonia/ of 32 px DICOMs whose PHI attributes and file names are canaries.

    PatientName, PatientID, PatientBirthDate, AccessionNumber and InstitutionAddress carry canary strings
    (two patients also get invalid, over-long values, which pydicom's validation would quote in a warning);
    each file name holds :data:`FILE_CANARY`. Pneumonia images carry a bright blob so the model can learn.
    """
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for label in ("normal", "pneumonia"):
        for i in range(n_per_class):
            img = chest_like(size, seed=int(rng.integers(1 << 30))).astype(np.float64)
            if label == "pneumonia":
                cx, cy = rng.uniform(0.28, 0.4), rng.uniform(0.35, 0.55)
                img += 1800 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.08**2)))
            img = np.clip(img, 0, 4095).astype(np.uint16)
            extra = {}
            if i == 0:  # invalid values (too long for their VR, not a date): pydicom warns, quoting them
                extra = {"PatientName": "CANARYNAME^" + "CANARYLONG" * 8, "PatientBirthDate": "CANARYDOB",
                         "AccessionNumber": "CANARYACCESSIONTOOLONG"}
            with warnings.catch_warnings():  # pydicom warns about the invalid values we mean to write
                warnings.simplefilter("ignore")
                write_dicom(root / label / f"{FILE_CANARY}_{label}_{i:03d}.dcm", img,
                            patient_id=f"{PID_CANARY}{label[0]}{i:03d}", sex="F" if i % 2 else "M",
                            age=f"{20 + 3 * i:03d}Y", InstitutionAddress=ADDRESS_CANARY, **extra)
    return root


#: Strings that must never appear outside the documented path columns (matched case-insensitively): every
#: canary above starts with "CANARY" (CANARY_NAME, CANARY_ACCESSION, PID_CANARY, FILE_CANARY, the address);
#: the birth date is digits, also looked for as an ISO date.
PHI_CANARIES = ("canary", CANARY_BIRTH, "1901-02-03")


@dataclass(frozen=True)
class Pipeline:
    """One uninterrupted run of the whole CLI pipeline on the canary dataset.

    Attributes:
        data: the scan folder.
        index: the output folder of ``medtransfer index``.
        run: the run directory (trained, evaluated, explained, reported).
        logs: ``<command>.stdout`` / ``<command>.stderr`` of every command (run with ``--verbose``).
    """

    data: Path
    index: Path
    run: Path
    logs: Path


PIPELINE_STEPS = ("index", "train", "evaluate", "explain", "report")


def _build_pipeline(root: Path) -> None:
    data = make_canary_dataset(root / "data")
    run, index, logs = root / "work" / "run", root / "index", root / "logs"
    logs.mkdir(parents=True)
    steps = {
        "index": ["-v", "index", str(data), "--out", str(index)],
        "train": ["-v", *train_args(data, run)],
        "evaluate": ["-v", "--quiet", "evaluate", str(run), "--n-boot", N_BOOT],
        "explain": ["-v", "--quiet", "explain", str(run), "--cases", "1"],
        "report": ["-v", "--quiet", "report", str(run)],
    }
    for name, args in steps.items():
        proc = cli(*args)
        (logs / f"{name}.stdout").write_text(proc.stdout, encoding="utf-8")
        (logs / f"{name}.stderr").write_text(proc.stderr, encoding="utf-8")
        assert_ok(proc)
    (root / "DONE").write_text("ok\n", encoding="utf-8")


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Pipeline:
    """The uninterrupted pipeline (about 40 s on two shared cores), built once per session."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # xdist workers share the session's folder
    root = shared / "reliability-pipeline"
    with FileLock(str(shared / "reliability-pipeline.lock")):
        if not (root / "DONE").is_file():
            if root.exists():
                shutil.rmtree(root)
            root.mkdir()
            _build_pipeline(root)
    return Pipeline(data=root / "data", index=root / "index", run=root / "work" / "run", logs=root / "logs")


def copy_run(run: Path, dest_parent: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """A private copy of a run directory named like the original (evaluation.json records the name).

    ``drop``: names (glob patterns, matched at every level) to leave out, e.g. ``("saliency", "report.*")``.
    """
    dest = dest_parent / run.name
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock", *drop))
    return dest
