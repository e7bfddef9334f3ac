"""``medtransfer adapt`` end to end on a tiny run, and ``--site`` in predict and evaluate (the CLI, as users call it).

The site is the same kind of images degraded (noise and contrast): the shift check must say so; with labels the
profile's table lists every option; ``predict --site`` / ``evaluate --site`` use the profile and write under
``RUN/sites/NAME``; an unknown site name is refused with the list of profiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEDTRANSFER_SALT": "test-salt-not-secret"}
    return subprocess.run([sys.executable, "-m", "medtransfer", "--quiet", *args], env=env, capture_output=True,
                          text=True, timeout=900)


def _degrade(src: Path, dst: Path, seed: int = 1) -> Path:
    """A copy of ``src`` as another hospital would send it: lower contrast, an offset, heavy noise."""
    rng = np.random.default_rng(seed)
    for f in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        a = ds.pixel_array.astype(np.float64)
        a = 0.6 * a + 700 + rng.normal(0, 250, a.shape)
        ds.PixelData = np.clip(a, 0, 4095).astype(np.uint16).tobytes()
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapt")
    data = make_tiny_dataset(root / "data", n_per_class=30)
    cmd = ["train", str(data), "--out", str(root / "run")]
    for item in [*TINY_OVERRIDES, "train.strategy=linear-probe"]:
        cmd += ["--set", item]
    proc = _cli(*cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = _degrade(make_tiny_dataset(root / "fresh", n_per_class=30, seed=7), root / "site")
    return root / "run", site


def test_adapt_without_labels_flags_the_shift_and_writes_a_profile(trained: tuple[Path, Path]) -> None:
    run, site = trained
    unlabelled = site.parent / "site-unlabelled"
    for f in site.rglob("*.dcm"):  # the same scans without their class folders: no labels at all
        (unlabelled / f.name).parent.mkdir(parents=True, exist_ok=True)
        (unlabelled / f.name).write_bytes(f.read_bytes())
    proc = _cli("adapt", str(run), str(unlabelled), "--name", "hospital-b", "--n-boot", "200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shift check: shift" in proc.stdout, proc.stdout
    folder = run / "sites" / "hospital-b"
    shift = json.loads((folder / "shift.json").read_text())
    assert shift["shift"] is True and shift["p_value"] < 0.01 and shift["domain_auroc"] > 0.8
    assert (folder / "profile.json").is_file() and (folder / "manifest.csv").is_file()
    # predict with the profile, and without it
    plain = _cli("predict", str(run), str(unlabelled), "--out", str(folder.parent / "plain.csv"))
    adapted = _cli("predict", str(run), str(unlabelled), "--site", "hospital-b", "--out", str(folder / "p.csv"))
    assert plain.returncode == 0 and adapted.returncode == 0, adapted.stderr[-3000:]
    p0 = pd.read_csv(folder.parent / "plain.csv").sort_values("case_id")
    p1 = pd.read_csv(folder / "p.csv").sort_values("case_id")
    assert list(p0["case_id"]) == list(p1["case_id"])
    profile = json.loads((folder / "profile.json").read_text())
    if profile.get("options"):  # whatever the profile applies changes the scores
        assert not np.allclose(p0["p_pneumonia"], p1["p_pneumonia"])
    # an unknown site is refused with the list of profiles
    bad = _cli("predict", str(run), str(unlabelled), "--site", "nowhere", "--out", str(folder / "x.csv"))
    assert bad.returncode == 1 and "hospital-b" in bad.stderr and "medtransfer adapt" in bad.stderr


def test_adapt_with_labels_judges_every_option_and_evaluate_site_writes_beside_it(trained: tuple[Path, Path]) -> None:
    run, site = trained
    proc = _cli("adapt", str(run), str(site), "--name", "labelled", "--n-boot", "200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run / "sites" / "labelled"
    table = pd.read_csv(folder / "adaptation.csv")
    assert len(table) >= 2 and "chosen" in table.columns and table["chosen"].astype(bool).sum() == 1
    ev = _cli("evaluate", str(run), "--data", str(site), "--site", "labelled", "--n-boot", "100")
    assert ev.returncode == 0, ev.stderr[-3000:]
    written = list((folder / "evaluation").rglob("evaluation.json"))
    assert written, list(folder.rglob("*"))
    assert not (run / "external").exists()  # the run's own evaluation folders are untouched
    # the report: a "Transfer to <site>" section, and with --site the facts page names the profile
    rep = _cli("report", str(run), "-f", "html", "--site", "labelled")
    assert rep.returncode == 0, rep.stderr[-3000:]
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "Transfer to labelled" in html and "Verdict:" in html and "What it cannot fix" in html
    assert "This report describes the model as site profile" in html
    assert 'alt="Site against training data: intensity histograms' in html  # the shift figure
    for option in table["option"]:
        assert str(option) in html
    plain = _cli("report", str(run), "-f", "html")
    assert plain.returncode == 0 and "This report describes" not in (run / "report.html").read_text("utf-8")
    assert "Transfer to labelled" in (run / "report.html").read_text("utf-8")
