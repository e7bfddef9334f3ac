"""Head fine-tuning on a site's labelled cases (L2-SP, cross-fitted), the option in the before/after table, its
profile round trip, and adaptation of a multi-class run (tiny data, real code paths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import medtransfer as mt
from medtransfer.adapt.adaptation import _auroc, adapt_site
from medtransfer.adapt.head import head_fit_problem, tune_head
from medtransfer.adapt.profile import HEAD_FILE, SiteProfile
from medtransfer.errors import CheckpointError
from medtransfer.io import read_json
from medtransfer.run_dir import Run
from tests.adapt.test_adaptation import PROBE, make_site, tiny_run
from tests.factories import chest_like, write_dicom


def _features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16-d features; the label lives in feature 1 (the trained head below looks at feature 0)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(float)
    x = rng.standard_normal((n, 16))
    x[:, 1] += 2.0 * (2 * y - 1)
    return x.astype(np.float32), y[:, None]


def _trained_head() -> nn.Linear:
    head = nn.Linear(16, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = 2.0  # what "training" learned: feature 0, which carries nothing at this site
        head.bias.zero_()
    return head


def test_tune_head_learns_the_site_signal_and_its_out_of_fold_logits_are_honest() -> None:
    x, y = _features(120, seed=0)
    keys = np.array([f"p{i // 2}" for i in range(len(x))])  # two cases per patient
    head = _trained_head()
    before = head.weight.detach().clone()
    fit = tune_head(head, x, y, keys, "binary", seed=0)
    assert torch.equal(head.weight, before)  # the run's head is left alone
    xt, yt = _features(400, seed=1)
    with torch.no_grad():
        auroc_tuned = _auroc(yt[:, 0], fit.head(torch.from_numpy(xt))[:, 0].numpy())
        auroc_base = _auroc(yt[:, 0], head(torch.from_numpy(xt))[:, 0].numpy())
    assert auroc_base < 0.6 < 0.9 < auroc_tuned
    assert fit.oof_logits.shape == (120, 1) and fit.folds == 5 and set(fit.cv_loss) == {1e-3, 1e-2, 1e-1, 1.0}
    assert _auroc(y[:, 0], fit.oof_logits[:, 0]) > 0.85  # out-of-fold: predicted by heads that never saw the case
    # folds never split a patient: each patient's two cases got logits from the same fold's head, so refitting
    # without patient grouping would differ; here we check the grouping directly
    from medtransfer.adapt.head import _folds
    folds = _folds(keys, y, "binary", 0)
    assert all(len(set(folds[keys == k])) == 1 for k in np.unique(keys))


def test_tune_head_stays_near_the_trained_head_when_it_already_fits_the_site() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 16)).astype(np.float32)
    y = (rng.random(80) < 1 / (1 + np.exp(-2.0 * x[:, 0]))).astype(float)[:, None]  # the trained head's own model
    fit = tune_head(_trained_head(), x, y, np.arange(80).astype(str), "binary", seed=0)
    moved = (fit.head.weight - _trained_head().weight).norm() / _trained_head().weight.norm()
    assert moved < 0.35, (moved, fit.strength, fit.cv_loss)


def test_head_fit_problem_names_what_is_missing() -> None:
    y = np.r_[np.ones(3), np.zeros(30)][:, None]
    assert "3 positive" in head_fit_problem(y, np.arange(33).astype(str))
    assert "at least 20" in head_fit_problem(np.ones((10, 1)), np.arange(10).astype(str))
    assert head_fit_problem(np.r_[np.ones(10), np.zeros(20)][:, None], np.arange(30).astype(str)) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def moved_site(tmp_path_factory: pytest.TempPathFactory) -> mt.Manifest:
    """60 labelled cases, 50% prevalence, brighter than training."""
    return mt.index_scans(make_site(tmp_path_factory.mktemp("hsite"), n_pos=30, n_neg=30, seed=9, brightness=400))


def test_the_head_option_is_judged_on_the_holdout_and_its_profile_reproduces_it(run: Run, moved_site: mt.Manifest,
                                                                                tmp_path: Path) -> None:
    profile, table = adapt_site(run, moved_site, labels_available=True, n_boot=100)
    row = table[table["option"] == "head+temperature+threshold"]
    assert len(row) == 1 and np.isfinite(row[["auroc", "auroc_lo", "ece", "ece_change_lo"]].to_numpy()).all()
    assert "L2-SP strength" in row.iloc[0]["note"]
    # the head option as a profile: saved, loaded (v2, head.safetensors), applied = the option's logits
    from medtransfer.adapt.adaptation import _Fit as Fit  # noqa: N814
    from medtransfer.adapt.adaptation import _profile
    head_state = {k: v + 0.01 for k, v in run.model.head.state_dict().items()}
    fit = Fit("head+temperature+threshold", ["head", "temperature", "threshold"], False, 1.5,
              dict(run.card.thresholds), head=head_state)
    prof = _profile(run, "h", fit, None, table, [], None, {})
    prof.save(tmp_path / "h")
    assert (tmp_path / "h" / HEAD_FILE).is_file()
    assert read_json(tmp_path / "h" / "profile.json")["version"] == 2
    back = SiteProfile.load(tmp_path / "h", run)
    adapted = back.apply(run)
    for k, v in adapted.model.head.state_dict().items():
        assert torch.allclose(v, head_state[k])
    assert not torch.allclose(next(iter(run.model.head.state_dict().values())),
                              next(iter(adapted.model.head.state_dict().values())))
    # a head of the wrong shape is refused with the fix
    bad = SiteProfile(name="bad", run_card_sha256=back.run_card_sha256, head={"weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="fine-tuned head does not fit"):
        bad.apply(run)


def test_no_head_option_when_switched_off_or_too_few_labels(run: Run, moved_site: mt.Manifest) -> None:
    _, table = adapt_site(run, moved_site, labels_available=True, n_boot=20, head=False)
    assert not any("head" in o for o in table["option"])
    few = mt.Manifest(moved_site.df.iloc[::3].copy(), list(moved_site.classes), moved_site.task, moved_site.data_dir)
    profile, table = adapt_site(run, few, labels_available=True, n_boot=20)
    assert not any("head" in o for o in table["option"])
    assert any(n.startswith("head: not tried:") for n in profile.notes)


# -- multi-class ----------------------------------------------------------------------------------------------
def _three_classes(root: Path, n: int, seed: int, brightness: float = 0.0) -> Path:
    """normal / left / right: a soft opacity in the left or right lung (48 px DICOMs, one case per patient)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:48] / 48
    for label in ("left", "normal", "right"):
        for i in range(n):
            img = chest_like(48, seed=int(rng.integers(1 << 30))).astype(np.float64) + brightness
            if label != "normal":
                cx = rng.uniform(0.25, 0.38) if label == "left" else rng.uniform(0.62, 0.75)
                img += 2000 * np.exp(-(((xx - cx) ** 2 + (yy - rng.uniform(0.35, 0.55)) ** 2) / (2 * 0.06**2)))
            write_dicom(root / label / f"{label}_{i:03d}.dcm", np.clip(img, 0, 4095).astype(np.uint16),
                        patient_id=f"M{seed}{label[0]}{i:03d}")
    return root


@pytest.mark.slow
def test_a_multiclass_run_adapts_with_and_without_labels(tmp_path: Path) -> None:
    data = _three_classes(tmp_path / "data", 16, seed=0)
    mc = mt.load_run(mt.train(data, overrides=PROBE, out=tmp_path / "run").path)
    assert mc.card.task == "multiclass" and len(mc.card.classes) == 3
    site = mt.index_scans(_three_classes(tmp_path / "site", 20, seed=4, brightness=500))
    profile, table = adapt_site(mc, site, labels_available=False, n_boot=50)
    assert table["chosen"].sum() == 1 and set(profile.training_prior) == set(mc.card.classes)
    assert all(f"prior_{c}" in table.columns for c in mc.card.classes)
    profile, table = adapt_site(mc, site, labels_available=True, n_boot=50)
    assert {"unadapted", "temperature+threshold", "head+temperature+threshold"} <= set(table["option"])
    assert table[["auroc", "ece"]].notna().all().all() and table["chosen"].sum() == 1
    scored = profile.apply(mc).predict(site)
    probs = scored[[f"p_{c}" for c in mc.card.classes]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
