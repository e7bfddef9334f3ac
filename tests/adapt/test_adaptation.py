"""Adapting a run to a new site: AdaBN, EM prevalence, refitted temperature and operating point, the
before/after table and its choice (tiny 48 px DICOM runs, real code paths)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from torch import nn

import medtransfer as mt
from medtransfer.adapt.adaptation import _ece, adabn, adapt_site, estimate_prior
from medtransfer.adapt.profile import SiteProfile
from medtransfer.errors import ConfigError
from medtransfer.run_dir import Run
from medtransfer.stats.calibration import ece
from tests.factories import chest_like, write_dicom
from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset

PROBE = [*TINY_OVERRIDES, "train.strategy=linear-probe", "train.epochs=15", "train.lr=0.01", "train.patience=15"]


def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A linear probe on 40 tiny DICOMs, trained once per session (reused from disk)."""
    root = tmp_path_factory.getbasetemp() / "adapt-run"
    if not (root / "run" / "model_card.json").is_file():
        make_tiny_dataset(root / "data")
        mt.train(root / "data", overrides=PROBE, out=root / "run")
    return mt.load_run(root / "run")


def make_site(root: Path, *, n_pos: int, n_neg: int, seed: int, brightness: float = 0.0, noise: float = 0.0,
              size: int = 48) -> Path:
    """A site of the training kind of images (normal/, pneumonia/), brighter and noisier, one case per patient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for label, n in (("normal", n_neg), ("pneumonia", n_pos)):
        for i in range(n):
            img = chest_like(size, seed=int(rng.integers(1 << 30))).astype(np.float64)
            if label == "pneumonia":
                cx, cy = rng.uniform(0.28, 0.4), rng.uniform(0.35, 0.55)
                img += 1800 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.06**2)))
            img = img + brightness + noise * rng.standard_normal(img.shape)
            write_dicom(root / label / f"{label}_{i:03d}.dcm", np.clip(img, 0, 4095).astype(np.uint16),
                        patient_id=f"S{seed}{label[0]}{i:03d}")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> mt.Manifest:
    """50 cases at 20% prevalence (training: 50%), brighter and noisier than training."""
    return mt.index_scans(make_site(tmp_path_factory.mktemp("site"), n_pos=10, n_neg=40, seed=5, brightness=600,
                                    noise=100))


def _as_fine_tuned(run: Run) -> Run:
    """The run as if its backbone (and BatchNorm statistics) had been trained: AdaBN's premise."""
    train = run.config.train.model_copy(update={"strategy": "fine-tune", "bn": "train"})
    return dataclasses.replace(run, config=run.config.model_copy(update={"train": train}))


# -- EM ------------------------------------------------------------------------------------------------------
def test_em_recovers_a_known_prior_from_calibrated_probabilities() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(4000) < 0.2  # site prevalence 0.2; the model was calibrated at 0.5
    s = rng.normal(np.where(y, 1.0, -1.0))
    p = expit(2 * s)[:, None]  # the exact posterior under equal priors for N(+-1, 1) scores
    assert abs(estimate_prior(p, np.array([0.5]), "binary")[0] - 0.2) < 0.05
    # multi-class: three Gaussian classes, calibrated at a uniform prior, seen at (0.6, 0.3, 0.1)
    means = np.array([-2.0, 0.0, 2.0])
    k = rng.choice(3, size=6000, p=[0.6, 0.3, 0.1])
    x = rng.normal(means[k])
    post = softmax(-0.5 * (x[:, None] - means[None]) ** 2, axis=1)
    est = estimate_prior(post, np.full(3, 1 / 3), "multiclass")
    assert np.allclose(est, [0.6, 0.3, 0.1], atol=0.05) and est.sum() == pytest.approx(1)


def test_the_fast_ece_is_the_stats_definition() -> None:
    rng = np.random.default_rng(1)
    p, y = rng.random(300), (rng.random(300) < 0.4).astype(float)
    assert _ece(y, p) == pytest.approx(ece(y, p))


# -- without labels --------------------------------------------------------------------------------------------
def test_without_labels_the_prevalence_is_corrected_and_decisions_stay(run: Run, site: mt.Manifest) -> None:
    profile, table = adapt_site(run, site, labels_available=False, n_boot=200, name="b")
    assert table["chosen"].sum() == 1 and list(table["option"][:1]) == ["unadapted"]
    assert profile.options == ["prevalence"]
    assert 0.1 < profile.prior["pneumonia"] < 0.35 and profile.training_prior["pneumonia"] == pytest.approx(0.5)
    assert any(n.startswith("prevalence: applied") for n in profile.notes)
    # a linear probe kept ImageNet's BatchNorm statistics: AdaBN is not its premise, and it says so
    assert any(n.startswith("adabn: not applied") and "ImageNet" in n for n in profile.notes)
    before, after = run.predict(site), profile.apply(run).predict(site)
    assert after["p_pneumonia"].mean() < before["p_pneumonia"].mean()
    assert (after["pred_pneumonia"] == before["pred_pneumonia"]).all()  # operating point moved with p


def test_a_model_without_batchnorm_gets_a_note_and_no_adabn(run: Run, site: mt.Manifest) -> None:
    plain = copy.deepcopy(run.model)
    for name, m in list(plain.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, attr, nn.Identity())
    no_bn = dataclasses.replace(_as_fine_tuned(run), model=plain)
    profile, table = adapt_site(no_bn, site, labels_available=False, n_boot=50)
    assert "adabn" not in profile.options and profile.bn_stats is None and "adabn" not in set(table["option"])
    assert any("no BatchNorm" in n for n in profile.notes)


def test_adabn_moves_batchnorm_statistics_to_the_site_and_changes_predictions(run: Run, site: mt.Manifest) -> None:
    tuned = _as_fine_tuned(run)
    adapted, used = adabn(tuned, site)
    assert used == len(site)
    first_bn = next(n for n, m in run.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    old = run.model.get_submodule(first_bn).running_mean.clone()
    new = adapted.get_submodule(first_bn).running_mean
    # the site's own mean input to that layer (eval mode: everything before it is unchanged)
    seen: list[torch.Tensor] = []
    hook = run.model.get_submodule(first_bn).register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].mean(dim=(0, 2, 3))))
    try:
        run.predict(site)
    finally:
        hook.remove()
    site_mean = torch.stack(seen).mean(0)
    assert torch.linalg.norm(new - site_mean) < 0.1 * torch.linalg.norm(old - site_mean)
    assert torch.equal(run.model.get_submodule(first_bn).running_mean, old)  # the run is untouched
    # through adapt_site: only when a shift was found (or not checked), never silently
    profile, _ = adapt_site(tuned, site, labels_available=False, n_boot=50, shift_detected=True)
    assert "adabn" in profile.options and any(n.startswith("adabn: applied") for n in profile.notes)
    assert not np.allclose(profile.apply(tuned).predict(site)["p_pneumonia"], run.predict(site)["p_pneumonia"])
    skipped, _ = adapt_site(tuned, site, labels_available=False, n_boot=50, shift_detected=False)
    assert "adabn" not in skipped.options and any("found no shift" in n for n in skipped.notes)


# -- with labels ------------------------------------------------------------------------------------------------
def test_with_labels_a_wrong_temperature_is_refitted_and_proven_on_the_holdout(run: Run, site: mt.Manifest) -> None:
    wrong = dataclasses.replace(run, card=run.card.model_copy(update={"temperature": 20.0}))  # far too soft
    profile, table = adapt_site(_as_fine_tuned(wrong), site, labels_available=True, n_boot=200)
    assert {"unadapted", "adabn", "prevalence", "temperature+threshold", "adabn+temperature+threshold"} <= set(
        table["option"])
    assert table["chosen"].sum() == 1
    for metric in ("auroc", "sensitivity", "specificity", "ece"):
        assert table[[metric, f"{metric}_lo", f"{metric}_hi"]].notna().all().all(), metric
        assert (table[f"{metric}_lo"] <= table[metric] + 1e-9).all() and (table[metric] <= table[f"{metric}_hi"]
                                                                          + 1e-9).all()
    chosen = table[table["chosen"]].iloc[0]
    base = table[table["option"] == "unadapted"].iloc[0]
    assert "temperature" in chosen["option"] and chosen["ece"] < base["ece"] and chosen["ece_change_hi"] < 0
    assert profile.options[-2:] == ["temperature", "threshold"] and profile.temperature != 20.0
    assert profile.evidence["table"][0]["option"] == "unadapted"
    assert any(n.startswith("chosen:") for n in profile.notes)


def test_labels_of_other_classes_are_refused(run: Run, tmp_path: Path) -> None:
    other = tmp_path / "other"
    for label in ("cat", "dog"):
        for i in range(3):
            write_dicom(other / label / f"{i}.dcm", chest_like(48, seed=i), patient_id=f"{label}{i}")
    with pytest.raises(ConfigError, match="do not match the run's"):
        adapt_site(run, mt.index_scans(other), labels_available=True, n_boot=10)


def test_profile_from_adaptation_round_trips(run: Run, site: mt.Manifest, tmp_path: Path) -> None:
    profile, _ = adapt_site(_as_fine_tuned(run), site, labels_available=False, n_boot=50, name="beta")
    profile.save(tmp_path / "beta")
    back = SiteProfile.load(tmp_path / "beta", run)
    assert back.options == profile.options and back.prior == pytest.approx(profile.prior)
    assert set(back.bn_stats) == set(profile.bn_stats)
