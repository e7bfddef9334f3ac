"""Site profiles: plain JSON + safetensors, bound to their run, applied without touching the run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit, logit

import medtransfer as mt
from medtransfer.adapt.profile import (
    BN_FILE,
    PROFILE_FILE,
    SiteProfile,
    batchnorm_stats,
    card_sha256,
    prior_offsets,
)
from medtransfer.errors import CheckpointError
from medtransfer.run_dir import Run
from tests.adapt.test_adaptation import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return tiny_run(tmp_path_factory)


def _profile(run: Run, **kw: object) -> SiteProfile:
    return SiteProfile(name="beta", run_card_sha256=card_sha256(run), **kw)  # type: ignore[arg-type]


def test_the_prior_correction_is_bayes_rule_on_probabilities(run: Run) -> None:
    t = 1.7
    calibrated = dataclasses.replace(run, card=run.card.model_copy(update={"temperature": t}))
    prior, train = {"normal": 0.8, "pneumonia": 0.2}, {"normal": 0.5, "pneumonia": 0.5}
    d = prior_offsets(prior, train, list(run.card.classes), "binary")
    profile = _profile(run, options=["prevalence"], temperature=t, prior=prior, training_prior=train,
                       logit_bias=[float(t * d[0])])
    x = torch.randn(6, run.card.input.channels, *run.card.input.size, generator=torch.Generator().manual_seed(0))
    p = calibrated.predict(x)["p_pneumonia"].to_numpy()
    q = profile.apply(calibrated).predict(x)["p_pneumonia"].to_numpy()
    r1, r0 = 0.2 / 0.5, 0.8 / 0.5
    np.testing.assert_allclose(q, p * r1 / (p * r1 + (1 - p) * r0), rtol=1e-5, atol=1e-6)
    # the offsets are those of Bayes' rule: logit(0.2) - logit(0.5)
    assert d[0] == pytest.approx(logit(0.2)) and expit(d[0]) == pytest.approx(0.2)
    multi = prior_offsets({"a": 0.2, "b": 0.3, "c": 0.5}, {"a": 0.4, "b": 0.3, "c": 0.3}, ["a", "b", "c"],
                          "multiclass")
    np.testing.assert_allclose(multi, np.log([0.5, 1.0, 5 / 3]))


def test_save_load_round_trip_with_batchnorm_statistics_in_safetensors(run: Run, tmp_path: Path) -> None:
    stats = {k: v + 1.0 for k, v in batchnorm_stats(run.model).items()}
    profile = _profile(run, options=["adabn", "threshold"], temperature=1.3, thresholds={"pneumonia": 0.4},
                       bn_stats=stats, evidence={"table": [{"option": "unadapted", "ece": 0.1}]},
                       notes=["adabn: applied"])
    folder = profile.save(tmp_path / "sites" / "beta")
    raw = json.loads((folder / PROFILE_FILE).read_text())
    assert raw["format"] == "medtransfer-site-profile" and "bn_stats" not in raw
    head = (folder / BN_FILE).read_bytes()[:16]
    assert not head.startswith(b"\x80") and b"PK" not in head[:2]  # safetensors, never a pickle or zip
    back = SiteProfile.load(folder, run)
    assert back.options == profile.options and back.thresholds == {"pneumonia": 0.4} and back.temperature == 1.3
    assert back.evidence == profile.evidence and back.notes == profile.notes
    assert set(back.bn_stats) == set(stats) and all(torch.equal(back.bn_stats[k], stats[k]) for k in stats)
    adapted = back.apply(run)
    name = next(iter(stats)).rsplit(".", 1)[0]
    assert torch.equal(adapted.model.get_submodule(name).running_mean, stats[f"{name}.running_mean"])
    assert adapted.card.thresholds == {"pneumonia": 0.4} and adapted.card.temperature == 1.3
    assert "beta" in adapted.card.notes


def test_a_profile_of_another_run_is_refused(run: Run, tmp_path: Path) -> None:
    folder = _profile(run, options=[]).save(tmp_path / "beta")
    other_dir = tmp_path / "other-run"
    shutil.copytree(run.path, other_dir, ignore=shutil.ignore_patterns("cache"))
    card = json.loads((other_dir / "model_card.json").read_text())
    card["created"] = "2020-01-01T00:00:00+00:00"  # another training of the same recipe
    (other_dir / "model_card.json").write_text(json.dumps(card))
    other = mt.load_run(other_dir)
    with pytest.raises(CheckpointError, match="made for another run") as err:
        SiteProfile.load(folder, other)
    assert str(other_dir) in str(err.value) and card_sha256(run)[:12] in str(err.value)
    with pytest.raises(CheckpointError, match="no site profile"):
        SiteProfile.load(tmp_path / "nowhere", run)


def test_apply_leaves_the_given_run_untouched(run: Run) -> None:
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    card = run.card.model_dump()
    stats = {k: v * 2 for k, v in batchnorm_stats(run.model).items()}
    adapted = _profile(run, options=["adabn", "prevalence", "temperature"], temperature=2.0, bn_stats=stats,
                       logit_bias=[0.7]).apply(run)
    assert adapted is not run and adapted.model is not run.model
    assert run.card.model_dump() == card
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    changed = [k for k, v in adapted.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("bias") for k in changed)
    with pytest.raises(CheckpointError, match="do not fit"):
        _profile(run, bn_stats={"nowhere.running_mean": torch.zeros(3)}).apply(run)
