"""Transfer and shortcut audits: summary logic, a constructed negative-transfer case, the demo data's
planted effects, and resuming a killed audit from its finished cells."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import medtransfer as mt
from medtransfer.audit.transfer import _fraction_to_reach, cell_name, subset_patients, summarise
from tests.factories import write_dicom

SMALL = ["input.size=[48, 48]", "train.batch_size=16", "train.augment.enabled=false", "data.val_fraction=0.25",
         "data.test_fraction=0.3"]


def _cells(scratch: float, pretrained: float) -> tuple[pd.DataFrame, dict]:
    rows, hist = [], {}
    for s, base in (("scratch", scratch), ("linear-probe", pretrained)):
        for f, drop in ((0.25, 0.1), (1.0, 0.0)):
            for seed in (0, 1):
                a = base - drop
                rows.append({"strategy": s, "fraction": f, "seed": seed, "val_auroc": a, "test_auroc": a,
                             "test_lo": a - 0.05, "test_hi": min(1.0, a + 0.05), "seconds": 10.0})
                # scratch climbs over 3 epochs; the pretrained probe is there after one
                hist[cell_name(s, f, seed)] = [{"epoch": e, "val_auroc": a * e / 3 if s == "scratch" else a,
                                                "seconds": 2.0} for e in (1, 2, 3)]
    return pd.DataFrame(rows), hist


def test_summary_warns_of_negative_transfer_only_when_scratch_matches_or_wins() -> None:
    worse = summarise(*_cells(scratch=0.95, pretrained=0.80))
    assert worse.summary["negative_transfer"] and worse.summary["negative_transfer"]["strong"]
    assert any(w.startswith("Negative transfer (strong)") for w in worse.warnings)
    better = summarise(*_cells(scratch=0.80, pretrained=0.90))
    assert better.summary["negative_transfer"] is None and not better.warnings
    eff = better.summary["data_efficiency"]["linear-probe"]
    assert eff["fraction_to_match"] == pytest.approx(0.25)  # 0.80 reached at the smallest fraction
    # time-to-target: target = scratch's mean val AUROC at 100%; pretrained gets there sooner
    sp = better.summary["speedup"]["linear-probe"]
    assert sp["seconds_to_target"] < sp["scratch_seconds_to_target"]


def test_fraction_to_reach_interpolates_in_log_fraction() -> None:
    fr = np.array([0.1, 1.0])
    assert _fraction_to_reach(fr, np.array([0.7, 0.9]), 0.8) == pytest.approx(10 ** -0.5)
    assert _fraction_to_reach(fr, np.array([0.7, 0.75]), 0.8) is None


def test_subsets_are_nested_stratified_and_patient_level(tmp_path: Path) -> None:
    data = mt.generate_sample_data(tmp_path / "d", n=60, size=48, extras=False)
    m = mt.index_scans(data, labels=data / "labels.csv")
    small, big = subset_patients(m, 0.25, 0), subset_patients(m, 0.5, 0)
    assert set(small.df.patient_key) < set(big.df.patient_key)
    assert set(small.df.label) == set(m.split("train").df.label)
    whole = set(m.split("train").df.patient_key)
    assert set(big.df.patient_key) <= whole
    # every case of a kept patient is kept
    kept = m.split("train").df[m.split("train").df.patient_key.isin(small.df.patient_key)]
    assert len(kept) == len(small)


def _pattern_dataset(root: Path, n: int = 32) -> Path:
    """Labels tied to a pixel pattern a CNN from scratch learns at once: a bright 12x12 square top-left.

    Pretraining cannot help here (the ImageNet probe also gets it right): scratch matches it, which is the
    "matches or beats" half of the negative-transfer rule."""
    rng = np.random.default_rng(0)
    for label in ("absent", "present"):
        for i in range(n):
            img = (rng.random((48, 48)) * 1000 + 500).astype(np.uint16)
            if label == "present":
                img[2:14, 2:14] = 4000
            write_dicom(root / label / f"{label}{i}.dcm", img, patient_id=f"{label}{i}")
    return root


@pytest.mark.slow
def test_constructed_negative_transfer_case_triggers_the_warning(tmp_path: Path) -> None:
    data = _pattern_dataset(tmp_path / "data")
    result = mt.audit_transfer(data, config="quickstart", overrides=SMALL, strategies=("scratch", "linear-probe"),
                               fractions=(1.0,), seeds=1, budget_epochs=4, n_boot=100, out=tmp_path / "audit")
    scratch = result.curve.set_index("strategy").loc["scratch", "test_auroc"]
    assert scratch >= 0.99, result.cells
    assert result.summary["negative_transfer"] is not None, result.curve
    assert (tmp_path / "audit" / "transfer.json").is_file()


@pytest.mark.slow
def test_on_demo_data_pretrained_leads_at_small_fractions_and_the_site_is_seen(tmp_path: Path) -> None:
    data = mt.generate_sample_data(tmp_path / "d", n=160, size=64, extras=False)
    result = mt.audit_transfer(data, labels=data / "labels.csv", config="demo",
                               overrides=["input.size=[64, 64]", "train.batch_size=16"],
                               strategies=("scratch", "linear-probe"), fractions=(0.25, 1.0), seeds=1,
                               budget_epochs=3, n_boot=100, out=tmp_path / "audit")
    curve = result.curve.set_index(["strategy", "fraction"])["test_auroc"]
    assert curve[("linear-probe", 0.25)] > curve[("scratch", 0.25)] + 0.05, curve
    run = mt.train(data, labels=data / "labels.csv", config="demo",
                   overrides=["input.size=[64, 64]", "train.strategy=linear-probe", "train.epochs=3"],
                   out=tmp_path / "run")
    cached = run.path / "cache" / "features"
    before = {f.name for f in cached.glob("*.safetensors")}
    assert len(before) == 2  # the linear probe cached its train and val features
    sc = mt.audit_shortcuts(run, n_boot=100)
    after = {f.name for f in cached.glob("*.safetensors")}
    assert before < after and len(after) == 3  # the audit reused them and encoded only the test split
    from medtransfer.audit.shortcuts import _features
    from medtransfer.inference import run_model

    direct = run_model(run.model, run.manifest, run.card.input, output="features").outputs
    np.testing.assert_allclose(_features(run.model, run.manifest, run, False), direct, atol=1e-5)
    probe = sc.probe.set_index("attribute")
    assert probe.loc["site", "flagged"], probe  # scanners differ in noise, gamma, polarity: features see it
    assert probe.loc["site", "balanced_accuracy"] > 0.8
    assert set(sc.loso["site"]) == set(run.manifest.df["site"])
    assert not sc.prevalence.empty and (run.path / "audit" / "shortcuts.json").is_file()
    # the report shows the audit
    html = mt.render_report(run.path, formats=("html",))["html"].read_text(encoding="utf-8")
    assert "Is the model learning the hospital?" in html and "Leave-one-site-out" in html


_AUDIT = ("import sys, medtransfer as mt; mt.audit_transfer(sys.argv[1], config='quickstart', overrides={o!r}, "
          "strategies=('linear-probe',), fractions=(0.25, 0.5, 1.0), seeds=2, budget_epochs=2, n_boot=50, "
          "out=sys.argv[2])")


@pytest.mark.slow
def test_killed_audit_continues_from_finished_cells(tmp_path: Path) -> None:
    from tests.training.conftest import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n_per_class=16)
    out = tmp_path / "audit"
    code = _AUDIT.format(o=SMALL)
    proc = subprocess.Popen([sys.executable, "-c", code, str(data), str(out)], env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "cells").glob("*.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert 1 <= len(done) < 6, "kill the audit after its first cell (it finished too fast to test)"
    assert not (out / "transfer.json").exists()
    subprocess.run([sys.executable, "-c", code, str(data), str(out)], check=True, env=os.environ.copy())
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(after) == 6
    assert all(after[name] == mtime for name, mtime in done.items())  # finished cells were not redone
    assert not list(out.glob("**/.tmp-*"))


def test_a_scratch_baseline_at_chance_is_called_out_and_the_gain_is_a_lower_bound() -> None:
    r = summarise(*_cells(scratch=0.52, pretrained=0.90))
    assert r.summary["scratch_learned"] is False
    assert any("did not learn within the epoch budget" in w for w in r.warnings)
    assert r.summary["data_efficiency"]["linear-probe"]["reached_at_smallest"]
    assert summarise(*_cells(scratch=0.80, pretrained=0.90)).summary["scratch_learned"] is True
