"""Adapting a trained run to a new site, with or without labels, never silently (issue 19, items 2 and 3).

Without labels:

- **AdaBN** (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation"): every
  BatchNorm's running statistics are re-estimated on the site's scans (eval-mode forward passes with the
  BatchNorm layers alone in train mode, cumulative average: :func:`medtransfer.training.loop.recompute_bn_stats`).
  Only for models with BatchNorm, and not when the shift check found no shift.
- **Prevalence** (label shift, Saerens, Latinne & Decaestecker 2002): the site's class prior is estimated by EM
  on the site's calibrated probabilities, starting from the training split's prior; a patient bootstrap gives
  its CI, and the correction (Bayes' rule, folded into the final bias: :mod:`.profile`) is applied only when
  the training prior lies outside that CI. The operating points move with the probabilities, so decisions at
  a sensitivity/specificity/Youden operating point are unchanged (those rules depend on the class-conditional
  score distributions, which label shift leaves alone); what changes is what a probability means at the site.

With labels (50-200 cases): the site's patients are split into an *adapt* and a *holdout* part. Every option
is fitted on the adapt part only (images and labels) and judged on the holdout: AUROC, sensitivity and
specificity at the option's operating point, and ECE, with patient-bootstrap CIs, and the paired bootstrap
change in ECE and AUROC against the unadapted model. ``temperature+threshold`` refits both with training's own
rule (:func:`medtransfer.training.calibrate.calibrate`: the cross-fitted temperature decision and the run's
``eval.threshold`` rule; a sensitivity or specificity target with the finite-sample rank rule, since 25-100 cases
would otherwise place the cut where new cases fall short of the target). ``head`` fine-tunes the classification head on the adapt part's frozen features
(:func:`tune_head`: L2-SP, i.e. a penalty pulling the weights towards the trained ones, its strength chosen by
patient-grouped cross-validation; temperature and operating point are then refitted on the cross-fitted
out-of-fold logits, so they are never fitted on logits of cases the head has seen). An option is kept only if the CI says it is better (the CI of its ECE change lies
below 0, or it meets the operating-point target the unadapted model misses) and not worse (its AUROC change
CI reaches 0; its sensitivity/specificity CI reaches the target); among those the lowest holdout ECE wins.
Otherwise the run stays as it is, and the notes say why.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, logit
from scipy.stats import rankdata
from torch import nn

from medtransfer import device as dev
from medtransfer.adapt.head import head_fit_problem, tune_head
from medtransfer.adapt.profile import SiteProfile, batchnorm_stats, card_sha256, prior_offsets
from medtransfer.data.dataset import ScanDataset, make_loader
from medtransfer.data.manifest import Manifest
from medtransfer.errors import ConfigError
from medtransfer.inference import TolerantDataset, run_model
from medtransfer.models.card import ModelCard
from medtransfer.models.outputs import probabilities, scored_classes, thresholds_of
from medtransfer.run_dir import Run
from medtransfer.stats.bootstrap import metric_intervals, percentile_ci, resample_indices, resample_weights
from medtransfer.training.calibrate import calibrate, one_vs_rest
from medtransfer.training.loop import recompute_bn_stats

logger = logging.getLogger(__name__)

#: ECE bins (equal width), as :func:`medtransfer.stats.calibration.ece` by default.
ECE_BINS = 10
CI = 0.95


# -- AdaBN ------------------------------------------------------------------------------------------------
def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has a BatchNorm layer that keeps running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def bn_stats_are_training_data(run: Run) -> bool:
    """Whether the run's BatchNorm statistics were learned from its training data (AdaBN's premise).

    A linear probe, and ``gradual`` from pretrained weights under ``train.bn: auto``/``frozen``, keep the
    pretrained (ImageNet) statistics: the head was fitted on features normalised with them, not with the
    training data's, so re-estimating them on a site would move its features away from what the head knows.
    """
    tc = run.config.train
    if tc.strategy == "linear-probe":
        return False
    bn = tc.bn
    if bn == "auto":
        bn = "frozen" if tc.strategy == "gradual" and run.config.model.weights != "none" else "train"
    return bn == "train"


def adabn(run: Run, site: Manifest, *, progress: bool = False) -> tuple[nn.Module, int]:
    """A copy of the run's model whose BatchNorm running statistics are re-estimated on ``site``'s scans.

    The copy stays in eval mode except its BatchNorm layers (dropout and stochastic depth off, so the
    statistics are those of the features inference sees); scans that cannot be decoded are left out.

    Returns:
        ``(model in eval mode on the CPU, number of scans used)``; with no BatchNorm or no decodable scan, an
        unchanged copy and 0.
    """
    net = copy.deepcopy(run.model).eval()
    if not has_batchnorm(net):
        return net, 0
    data = TolerantDataset(ScanDataset(site, run.card.input, train=False, cache_dir=run.cache_dir))
    loader = make_loader(data, batch_size=run.config.train.batch_size, shuffle=False,
                         num_workers=run.config.train.num_workers)
    target = dev.resolve_device(run.config.train.device)
    seen = [0]

    def good_batches() -> Iterator[dict[str, Any]]:
        for batch in loader:
            keep = torch.tensor([not e for e in batch["error"]], dtype=torch.bool)
            if keep.any():
                seen[0] += int(keep.sum())
                yield {"image": batch["image"][keep], "label": batch["label"][keep]}

    trial = copy.deepcopy(net).to(target)
    for m in trial.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    recompute_bn_stats(trial, good_batches(), device=target)
    if seen[0] == 0:
        logger.warning("AdaBN: none of the site's %d scans could be decoded; BatchNorm statistics kept", len(site))
        return net, 0
    return trial.to("cpu").eval(), seen[0]


# -- prevalence (EM, Saerens et al. 2002) -------------------------------------------------------------------
def _em(p: np.ndarray, prior0: np.ndarray, weights: np.ndarray, *, max_iter: int, tol: float) -> np.ndarray:
    """EM for the class prior of (B, N) weighted resamples of posteriors ``p`` (N, K) made under ``prior0``."""
    prior = np.tile(prior0, (len(weights), 1))
    total = weights.sum(axis=1, keepdims=True)
    for _ in range(max_iter):
        q = p[None] * (prior / prior0)[:, None, :]
        q /= np.clip(q.sum(axis=2, keepdims=True), 1e-300, None)
        new = np.einsum("bn,bnk->bk", weights, q) / np.clip(total, 1e-300, None)
        done = np.max(np.abs(new - prior)) < tol
        prior = new
        if done:
            break
    return prior


def _as_classes(p: np.ndarray, task: str) -> list[np.ndarray]:
    """Posterior matrices EM works on: one (N, K) for multi-class, one (N, 2) per scored class otherwise."""
    if task == "multiclass":
        return [p]
    return [np.stack([1 - p[:, j], p[:, j]], axis=1) for j in range(p.shape[1])]


def estimate_prior(p: np.ndarray, training_prior: np.ndarray, task: str, *, max_iter: int = 1000,
                   tol: float = 1e-8) -> np.ndarray:
    """The site's class prior by EM (Saerens et al. 2002) from calibrated probabilities made under the training prior.

    Args:
        p: calibrated probabilities (N, len(scored_classes)) as :func:`~medtransfer.models.outputs.probabilities`
            gives them (binary: (N, 1), the positive class).
        training_prior: (len(scored_classes),): the training prevalence of each scored class (multi-class: all
            classes, summing to 1).
        task: binary / multiclass / multilabel (multi-label: each class on its own).

    Returns:
        (len(scored_classes),) estimated site prevalence.

    Examples:
        >>> rng = np.random.default_rng(0); y = rng.random(20000) < 0.2; s = rng.normal(np.where(y, 1, -1))
        >>> round(float(estimate_prior(expit(2 * s)[:, None], np.array([0.5]), "binary")[0]), 2)
        0.2
    """
    return _prior_draws(np.asarray(p, dtype=np.float64).reshape(len(p), -1), np.asarray(training_prior, float),
                        task, np.ones((1, len(p))), max_iter=max_iter, tol=tol)[0]


def _prior_draws(p: np.ndarray, training_prior: np.ndarray, task: str, weights: np.ndarray, *, max_iter: int = 1000,
                 tol: float = 1e-8) -> np.ndarray:
    """:func:`estimate_prior` for each row of resample weights (B, N): (B, len(scored_classes))."""
    if task == "multiclass":
        return _em(p, training_prior, weights, max_iter=max_iter, tol=tol)
    cols = [_em(m, np.array([1 - t, t]), weights, max_iter=max_iter, tol=tol)[:, 1]
            for m, t in zip(_as_classes(p, task), training_prior, strict=True)]
    return np.stack(cols, axis=1)


def training_prior(run: Run) -> dict[str, float]:
    """The training split's prevalence per class (binary and multi-class: all classes; multi-label: each class).

    From the run's manifest (train split), else the card's training counts (single-label tasks).
    """
    classes = list(run.card.classes)
    if run.manifest is not None and "split" in run.manifest.df and (run.manifest.df["split"] == "train").any():
        y = run.manifest.split("train").targets()
        if run.card.task == "multilabel":
            return {c: float(np.nanmean(y[:, j])) for j, c in enumerate(classes)}
        counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=len(classes)).astype(float)
        return {c: float(v) for c, v in zip(classes, counts / counts.sum(), strict=True)}
    counts = (run.card.training or {}).get("counts", {}).get("train")
    if run.card.task == "multilabel" or not counts:
        raise ConfigError(f"{run.path}: the run has no manifest with a train split (and its card no training "
                          "counts), so the training prevalence is unknown; the prevalence correction needs it.")
    total = float(sum(counts.values()))
    return {c: float(counts.get(c, 0)) / total for c in classes}


def _scored_prior(prior: dict[str, float], card: ModelCard) -> np.ndarray:
    keys = list(card.classes) if card.task == "multiclass" else scored_classes(card)
    return np.array([prior[c] for c in keys])


def _full_prior(values: np.ndarray, card: ModelCard) -> dict[str, float]:
    if card.task == "binary":
        return {card.classes[0]: float(1 - values[0]), card.classes[1]: float(values[0])}
    return {c: float(v) for c, v in zip(card.classes, values, strict=True)}


@dataclass
class PriorEstimate:
    """EM's estimate of the site prior with a patient-bootstrap CI, and whether it differs from training's."""

    estimate: dict[str, float]
    lo: dict[str, float]
    hi: dict[str, float]
    training: dict[str, float]
    differs: bool
    offsets: np.ndarray = field(repr=False)

    def as_json(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi, "training": self.training,
                "differs": self.differs, "method": "EM (Saerens et al. 2002), patient-bootstrap CI"}


def prior_with_ci(p: np.ndarray, keys: np.ndarray, card: ModelCard, train_prior: dict[str, float], *,
                  n_boot: int, seed: int) -> PriorEstimate:
    """EM on calibrated probabilities ``p`` (N, K'), its patient-bootstrap CI, and the Bayes'-rule offsets."""
    pi0 = _scored_prior(train_prior, card)
    point = _prior_draws(p, pi0, card.task, np.ones((1, len(p))))[0]
    draws = np.concatenate([_prior_draws(p, pi0, card.task, w, max_iter=300, tol=1e-6)
                            for w in resample_weights(keys, n_boot, seed)]) if n_boot else np.empty((0, len(pi0)))
    bounds = np.array([percentile_ci(draws[:, j], CI, n_boot) for j in range(len(pi0))]).reshape(len(pi0), 2)
    names = list(card.classes) if card.task == "multiclass" else scored_classes(card)
    lo = {c: float(b[0]) for c, b in zip(names, bounds, strict=True)}
    hi = {c: float(b[1]) for c, b in zip(names, bounds, strict=True)}
    differs = bool(np.any((pi0 < bounds[:, 0]) | (pi0 > bounds[:, 1])))
    estimate = _full_prior(point, card)
    offsets = prior_offsets(estimate, train_prior, list(card.classes), card.task)
    return PriorEstimate(estimate, lo, hi, train_prior, differs, offsets)


def _shift_thresholds(thresholds: dict[str, float], offsets: np.ndarray, card: ModelCard) -> dict[str, float]:
    """Operating points moved with the probabilities, so decisions stay (binary, multi-label; multi-class: kept)."""
    if card.task == "multiclass":
        return dict(thresholds)
    out = {}
    for j, c in enumerate(scored_classes(card)):
        t = float(np.clip(thresholds[c], 1e-9, 1 - 1e-9))
        out[c] = float(np.clip(expit(logit(t) + offsets[j]), 1e-9, 1.0))
    return out


# -- one option: temperature, thresholds and prior offsets fitted on some cases --------------------------
@dataclass
class _Fit:
    name: str
    parts: list[str]
    adabn: bool
    temperature: float | None
    thresholds: dict[str, float]
    offsets: np.ndarray | None = None
    prior: PriorEstimate | None = None
    note: str = ""
    head: dict[str, torch.Tensor] | None = None

    def probabilities(self, logits: np.ndarray, card: ModelCard) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if self.offsets is not None:
            z = z + (self.temperature or 1.0) * self.offsets[None, :]
        return probabilities(z, card.model_copy(update={"temperature": self.temperature}))


def _labels_of(m: Manifest, card: ModelCard) -> np.ndarray:
    return one_vs_rest(np.asarray(m.targets()), card.task, len(card.classes))


def _patient_split(site: Manifest, card: ModelCard, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (adapt, holdout) over the site's cases: patients split, stratified by their first label."""
    if not 0 < fraction < 1:
        raise ConfigError(f"adapt_fraction must lie in (0, 1), e.g. 0.5; got {fraction}")
    keys = site.df["patient_key"].astype(str).to_numpy()
    y = np.nan_to_num(_labels_of(site, card), nan=-1)
    stratum = y.argmax(axis=1) if card.task == "multiclass" else y[:, 0]
    first = pd.Series(stratum).groupby(keys).first()
    rng = np.random.default_rng(seed)
    adapt_patients: set[str] = set()
    for _, patients in first.groupby(first.values):
        names = patients.index.to_numpy()
        names = names[rng.permutation(len(names))]
        adapt_patients.update(names[: int(round(fraction * len(names)))])
    adapt = np.array([k in adapt_patients for k in keys])
    return adapt, ~adapt


# -- holdout figures -------------------------------------------------------------------------------------
def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    pos = y == 1
    n1, n0 = int(pos.sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    """Equal-width ECE, the definition of :func:`medtransfer.stats.calibration.ece`, vectorised for resamples."""
    if y.size == 0:
        return float("nan")
    ids = np.clip(np.floor(p * ECE_BINS).astype(np.int64), 0, ECE_BINS - 1)
    n = np.bincount(ids, minlength=ECE_BINS)
    gap = np.abs(np.bincount(ids, weights=p, minlength=ECE_BINS) - np.bincount(ids, weights=y, minlength=ECE_BINS))
    return float(gap.sum() / n.sum())


FIGURES = ("auroc", "sensitivity", "specificity", "ece")


def _figures(y: np.ndarray, p: np.ndarray, thr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Macro AUROC, sensitivity, specificity and ECE over scored classes (unknown labels left out)."""
    out = np.full((len(FIGURES), y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        yj, pj = y[idx, j], p[idx, j]
        known = np.isfinite(yj)
        yj, pj = yj[known], pj[known]
        flag = pj >= thr[j]
        pos, neg = yj == 1, yj == 0
        out[:, j] = [_auroc(yj, pj), flag[pos].mean() if pos.any() else np.nan,
                     (~flag[neg]).mean() if neg.any() else np.nan, _ece(yj, pj)]
    with np.errstate(all="ignore"):
        return np.array([np.nan if np.all(np.isnan(r)) else np.nanmean(r) for r in out])


def _holdout_table(fits: list[_Fit], probs: list[np.ndarray], y: np.ndarray, keys: np.ndarray, card: ModelCard, *,
                   n_boot: int, seed: int) -> pd.DataFrame:
    """One row per option: holdout figures with CIs, and paired changes in ECE and AUROC against the first."""
    classes = scored_classes(card)
    thr = [np.array([f.thresholds[c] for c in classes]) for f in fits]
    idx_all = np.arange(len(y))
    points = np.array([_figures(y, p, t, idx_all) for p, t in zip(probs, thr, strict=True)])  # (O, 4)
    draws = np.array([[_figures(y, p, t, idx) for p, t in zip(probs, thr, strict=True)]
                      for idx in resample_indices(keys, n_boot, seed)]) if n_boot else np.empty((0, len(fits), 4))
    rows = []
    for o, f in enumerate(fits):
        row: dict[str, Any] = {"option": f.name, "options": "+".join(f.parts),
                               "temperature": f.temperature if f.temperature is not None else np.nan,
                               "thresholds": "; ".join(f"{c}={f.thresholds[c]:.4f}" for c in classes)}
        for k, name in enumerate(FIGURES):
            lo, hi = percentile_ci(draws[:, o, k], CI, n_boot) if n_boot else (np.nan, np.nan)
            row.update({name: points[o, k], f"{name}_lo": lo, f"{name}_hi": hi})
        if len(classes) == 1 and n_boot:  # binary: intervals that do not collapse at 0 and 1 (stats.bootstrap)
            known = np.isfinite(y[:, 0])
            mi = metric_intervals(y[known, 0], probs[o][known, 0], float(thr[o][0]), clusters=keys[known],
                                  n_boot=n_boot, seed=seed, metrics=("auroc", "sensitivity", "specificity"))
            for name, r in mi.items():
                row.update({name: r.point, f"{name}_lo": r.lo, f"{name}_hi": r.hi})
        for k, name in ((3, "ece"), (0, "auroc")):
            diff = draws[:, o, k] - draws[:, 0, k]
            lo, hi = percentile_ci(diff, CI, n_boot) if n_boot and o else (np.nan, np.nan)
            row.update({f"{name}_change": points[o, k] - points[0, k], f"{name}_change_lo": lo,
                        f"{name}_change_hi": hi})
        row.update({"n_holdout": int(len(y)), "patients_holdout": int(len(np.unique(keys))), "note": f.note})
        rows.append(row)
    return pd.DataFrame(rows)


def _choose(table: pd.DataFrame, method: str, target: float | None) -> tuple[int, list[str]]:
    """The chosen row (0: unadapted) and a note per option saying why it was or was not kept."""
    def meets(row: pd.Series) -> bool:
        if method not in ("sensitivity", "specificity") or target is None:
            return True
        return bool(row[f"{method}_hi"] >= target - 1e-12) if np.isfinite(row[f"{method}_hi"]) else \
            bool(row[method] >= target)

    base = table.iloc[0]
    base_meets = meets(base)
    eligible: list[int] = []
    notes = []
    for i in range(1, len(table)):
        row = table.iloc[i]
        name = row["option"]
        if not np.isfinite(row["ece"]):
            notes.append(f"{name}: not kept: no holdout figures ({row['note'] or 'not fitted'})")
            continue
        better_ece = np.isfinite(row["ece_change_hi"]) and row["ece_change_hi"] < 0
        fixes_target = not base_meets and meets(row)
        worse_auroc = np.isfinite(row["auroc_change_hi"]) and row["auroc_change_hi"] < 0
        figures = (f"holdout ECE {base['ece']:.3f} -> {row['ece']:.3f} (change CI {row['ece_change_lo']:.3f} to "
                   f"{row['ece_change_hi']:.3f}), AUROC change CI {row['auroc_change_lo']:.3f} to "
                   f"{row['auroc_change_hi']:.3f}")
        if worse_auroc:
            notes.append(f"{name}: not kept: it lowers AUROC ({figures})")
        elif not (meets(row) or not base_meets):
            notes.append(f"{name}: not kept: its {method} CI ({row[f'{method}_lo']:.3f}-{row[f'{method}_hi']:.3f}) "
                         f"falls short of the target {target} ({figures})")
        elif not (better_ece or fixes_target):
            notes.append(f"{name}: not kept: the CI does not show it better than the unadapted model ({figures})")
        else:
            eligible.append(i)
            notes.append(f"{name}: better than unadapted ({figures}"
                         f"{'; it reaches the operating-point target the unadapted model misses' if fixes_target else ''})")
    if not eligible:
        return 0, notes
    best = min(eligible, key=lambda i: (table.iloc[i]["ece"], len(table.iloc[i]["options"].split("+")), i))
    return best, notes


# -- the entry point -------------------------------------------------------------------------------------
def _logits(model: nn.Module, run: Run, site: Manifest, progress: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    out = run_model(model, site, run.card.input, batch_size=run.config.train.batch_size,
                    device=run.config.train.device, amp=run.config.train.amp, cpu_bf16=run.config.train.cpu_bf16,
                    num_workers=run.config.train.num_workers, cache_dir=run.cache_dir, progress=progress,
                    description=what)
    return np.asarray(out.outputs, dtype=np.float64).reshape(len(site), -1), out.ok


def adapt_site(run: Run, site: Manifest, *, labels_available: bool, seed: int = 0, n_boot: int = 1000,
               adapt_fraction: float = 0.5, progress: bool = False, shift_detected: bool | None = None,
               name: str = "site", head: bool = True) -> tuple[SiteProfile, pd.DataFrame]:
    """Adapt ``run`` to the site whose cases are ``site``; the profile and its before/after table.

    Args:
        run: the trained run (left untouched).
        site: the site's cases (a folder indexed with or without labels).
        labels_available: the site manifest carries the run's labels: fit on an adapt part, judge on a holdout
            part (module docstring); else label-free adaptation only.
        seed: seed of the patient split and the bootstraps.
        n_boot: bootstrap resamples for every CI.
        adapt_fraction: the share of the site's patients used to fit (labelled sites).
        progress: progress display.
        shift_detected: the shift check's verdict: False skips AdaBN (noted); None (not checked) allows it.
        name: the site's name, recorded in the profile.
        head: with labels, also try fine-tuning the head on the adapt part (``head+temperature+threshold``).

    Returns:
        ``(profile, table)``: the table has one row per option (``unadapted`` first) and a ``chosen`` column
        (exactly one True); with labels it holds holdout AUROC, sensitivity, specificity and ECE with CIs
        (``*_lo``, ``*_hi``) and the paired changes against unadapted; without labels the estimated prior and
        the mean probability and positive rate per scored class.

    Raises:
        ConfigError: labels asked for but the site has none or other classes; a bad ``adapt_fraction``.

    Examples:
        >>> profile, table = adapt_site(run, mt.index_scans("site_b/", labels="b.csv"), labels_available=True)  # doctest: +SKIP
        >>> table[["option", "ece", "ece_lo", "ece_hi", "chosen"]]  # doctest: +SKIP
    """
    card = run.card
    if len(site) == 0:
        raise ConfigError("the site has no cases to adapt to")
    if labels_available and (not site.has_labels or list(site.classes) != list(card.classes)
                             or site.task != card.task):
        raise ConfigError(f"the site's labels ({site.task}: {site.classes}) do not match the run's ({card.task}: "
                          f"{card.classes}); give a labels CSV with the run's classes, or adapt without labels")
    notes: list[str] = []
    bn = has_batchnorm(run.model)
    own_stats = bn and bn_stats_are_training_data(run)
    use_adabn = own_stats and shift_detected is not False
    if not bn:
        notes.append("adabn: not applied: the model has no BatchNorm layers (nothing to re-estimate)")
    elif not own_stats:
        notes.append(f"adabn: not applied: this run kept the pretrained BatchNorm statistics while training "
                     f"(strategy {run.config.train.strategy}, train.bn {run.config.train.bn}), so its head was "
                     "fitted on features normalised with ImageNet's statistics, not the training data's; "
                     "re-estimating them on the site would move its features away from what the head knows")
    elif shift_detected is False:
        notes.append("adabn: not applied: the shift check found no shift, so the training statistics stand")
    try:
        train_prior: dict[str, float] | None = training_prior(run)
    except ConfigError as exc:
        train_prior = None
        notes.append(f"prevalence: not estimated: {exc}")
    base = _Fit("unadapted", [], False, card.temperature, thresholds_of(card))
    if labels_available:
        return _with_labels(run, site, base, use_adabn, train_prior, notes, seed=seed, n_boot=n_boot,
                            fraction=adapt_fraction, progress=progress, name=name, head=head)
    return _without_labels(run, site, base, use_adabn, train_prior, notes, seed=seed, n_boot=n_boot,
                           progress=progress, name=name)


def _profile(run: Run, name: str, fit: _Fit, model: nn.Module | None, table: pd.DataFrame, notes: list[str],
             train_prior: dict[str, float] | None, evidence: dict[str, Any]) -> SiteProfile:
    parts = list(fit.parts)
    offsets = fit.offsets
    return SiteProfile(
        name=name, run_card_sha256=card_sha256(run), options=parts, temperature=fit.temperature,
        thresholds=dict(fit.thresholds), prior=fit.prior.estimate if fit.prior is not None else None,
        training_prior=train_prior,
        logit_bias=[float((fit.temperature or 1.0) * d) for d in offsets] if offsets is not None else None,
        bn_stats=batchnorm_stats(model) if fit.adabn and model is not None else None, head=fit.head,
        evidence={**evidence, "table": _records(table)}, notes=notes)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
            for r in table.to_dict(orient="records")]


def _without_labels(run: Run, site: Manifest, base: _Fit, use_adabn: bool, train_prior: dict[str, float] | None,
                    notes: list[str], *, seed: int, n_boot: int, progress: bool, name: str
                    ) -> tuple[SiteProfile, pd.DataFrame]:
    card = run.card
    keys_all = site.df["patient_key"].astype(str).to_numpy()
    logits, ok = _logits(run.model, run, site, progress, "site predictions")
    variants: list[tuple[_Fit, np.ndarray, np.ndarray]] = [(base, logits, ok)]
    model_a, evidence = None, {"labelled": False, "n_cases": int(len(site))}
    current = base
    if use_adabn:
        model_a, used = adabn(run, site, progress=progress)
        if used:
            la, ok_a = _logits(model_a, run, site, progress, "site predictions (AdaBN)")
            current = _Fit("adabn", ["adabn"], True, card.temperature, dict(base.thresholds),
                           note=f"BatchNorm statistics re-estimated on {used} site scans")
            variants.append((current, la, ok_a))
            notes.append(f"adabn: applied: BatchNorm statistics re-estimated on {used} site scans; without labels "
                         "its effect on accuracy cannot be measured here (adapt with --labels to check it)")
            evidence["adabn"] = {"scans": used}
        else:
            notes.append("adabn: not applied: no site scan could be decoded")
    if train_prior is not None:
        fit_v, lg, okv = variants[-1]
        p = fit_v.probabilities(lg[okv], card)
        est = prior_with_ci(p, keys_all[okv], card, train_prior, n_boot=n_boot, seed=seed)
        evidence["prior"] = est.as_json()
        shown = ", ".join(f"{c} {est.estimate.get(c, np.nan):.3f} (CI {est.lo[c]:.3f}-{est.hi[c]:.3f}; training "
                          f"{train_prior[c]:.3f})" for c in est.lo)
        parts = [*fit_v.parts, "prevalence"]
        fit_p = _Fit("+".join(parts), parts, fit_v.adabn, fit_v.temperature,
                     _shift_thresholds(fit_v.thresholds, est.offsets, card), est.offsets, est, note=shown)
        variants.append((fit_p, lg, okv))
        if est.differs:
            current = fit_p
            notes.append(f"prevalence: applied: the site's estimated prevalence differs from training beyond its "
                         f"bootstrap CI: {shown}; operating points moved with the probabilities (decisions unchanged)")
        else:
            notes.append(f"prevalence: not applied: the training prevalence lies within the CI of the site's "
                         f"estimate ({shown})")
    classes = scored_classes(card)
    rows = []
    for fit, lg, okv in variants:
        p = fit.probabilities(lg[okv], card)
        row: dict[str, Any] = {"option": fit.name, "options": "+".join(fit.parts),
                               "temperature": fit.temperature if fit.temperature is not None else np.nan,
                               "thresholds": "; ".join(f"{c}={fit.thresholds[c]:.4f}" for c in classes)}
        for j, c in enumerate(classes):
            row[f"mean_p_{c}"] = float(p[:, j].mean()) if len(p) else np.nan
            row[f"positive_rate_{c}"] = float((p[:, j] >= fit.thresholds[c]).mean()) if len(p) else np.nan
            if fit.prior is not None:
                row.update({f"prior_{c}": fit.prior.estimate[c], f"prior_{c}_lo": fit.prior.lo[c],
                            f"prior_{c}_hi": fit.prior.hi[c]})
        row.update({"n_cases": int(okv.sum()), "chosen": fit is current, "note": fit.note})
        rows.append(row)
    table = pd.DataFrame(rows)
    return _profile(run, name, current, model_a, table, notes, train_prior, evidence), table


def _with_labels(run: Run, site: Manifest, base: _Fit, use_adabn: bool, train_prior: dict[str, float] | None,
                 notes: list[str], *, seed: int, n_boot: int, fraction: float, progress: bool, name: str,
                 head: bool = True) -> tuple[SiteProfile, pd.DataFrame]:
    card, cfg = run.card, run.config
    adapt_mask, hold_mask = _patient_split(site, card, fraction, seed)
    adapt_m = Manifest(site.df[adapt_mask].copy(), list(site.classes), site.task, site.data_dir)
    keys = site.df["patient_key"].astype(str).to_numpy()
    y = _labels_of(site, card)
    passes: dict[bool, tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray]] = {}
    feats0, logits0, ok0 = _site_pass(run.model, run, site, progress, "site predictions")
    passes[False] = (run.model, feats0, logits0, ok0)
    model_a = None
    if use_adabn:
        model_a, used = adabn(run, adapt_m, progress=progress)
        if used:
            passes[True] = (model_a, *_site_pass(model_a, run, site, progress, "site predictions (AdaBN)"))
        else:
            notes.append("adabn: not evaluated: no scan of the adapt part could be decoded")
    evidence: dict[str, Any] = {"labelled": True, "n_cases": int(len(site)), "seed": seed,
                                "adapt": {"cases": int(adapt_mask.sum()), "patients": int(len(set(keys[adapt_mask])))},
                                "holdout": {"cases": int(hold_mask.sum()), "patients": int(len(set(keys[hold_mask])))},
                                "threshold_rule": {"method": cfg.eval.threshold, "target": cfg.eval.target}}
    # every option: its fit and the (logits, ok) it is judged on
    fits: list[_Fit] = [base]
    judged: list[tuple[np.ndarray, np.ndarray]] = [(logits0, ok0)]
    for with_bn in sorted(passes):
        model_v, feats, lg, ok = passes[with_bn]
        fit_rows = adapt_mask & ok
        prefix = ["adabn"] if with_bn else []
        if with_bn:
            fits.append(_Fit("adabn", prefix, True, card.temperature, dict(base.thresholds)))
            judged.append((lg, ok))
        if train_prior is not None:
            p = base.probabilities(lg[fit_rows], card)
            est = prior_with_ci(p, keys[fit_rows], card, train_prior, n_boot=min(n_boot, 200), seed=seed)
            parts = [*prefix, "prevalence"]
            fits.append(_Fit("+".join(parts), parts, with_bn, card.temperature,
                             _shift_thresholds(base.thresholds, est.offsets, card), est.offsets, est,
                             note="EM prior " + ", ".join(f"{c} {v:.3f}" for c, v in est.estimate.items())))
            judged.append((lg, ok))
        parts = [*prefix, "temperature", "threshold"]
        fit_m = Manifest(site.df[fit_rows].copy(), list(site.classes), site.task, site.data_dir)
        refit = calibrate(run.model, fit_m, card, cfg, logits=lg[fit_rows], finite_sample=True)
        fits.append(_Fit("+".join(parts), parts, with_bn, refit.temperature, thresholds_of(refit),
                         note=str(refit.calibration.get("reason", ""))))
        judged.append((lg, ok))
        if head:
            tuned = _head_option(model_v, feats, y, keys, fit_rows, ok, fit_m, run, prefix, with_bn, notes, seed)
            if tuned is not None:
                fits.append(tuned[0])
                judged.append(tuned[1])
    common = np.logical_and.reduce([hold_mask & ok for _, ok in judged])  # every option on the same holdout cases
    probs = [f.probabilities(lg[common], card) for f, (lg, _) in zip(fits, judged, strict=True)]
    table = _holdout_table(fits, probs, y[common], keys[common], card, n_boot=n_boot, seed=seed)
    chosen, why = _choose(table, cfg.eval.threshold, cfg.eval.target)
    table["chosen"] = np.arange(len(table)) == chosen
    notes.extend(why)
    if chosen == 0:
        notes.append("kept the run as it is: no option was shown better than the unadapted model on the holdout "
                     f"({int(common.sum())} cases); more labelled cases narrow the CIs")
    else:
        notes.append(f"chosen: {fits[chosen].name} (lowest holdout ECE among the options shown better)")
    evidence["selection"] = {"chosen": fits[chosen].name, "rule": "ECE change CI below 0 (or the operating-point "
                             "target met where unadapted misses it), AUROC change CI reaching 0, target within the CI"}
    return _profile(run, name, fits[chosen], model_a, table, notes, train_prior, evidence), table


def _head_option(model: nn.Module, feats: np.ndarray, y: np.ndarray, keys: np.ndarray, fit_rows: np.ndarray,
                 ok: np.ndarray, fit_m: Manifest, run: Run, prefix: list[str], with_bn: bool, notes: list[str],
                 seed: int) -> tuple[_Fit, tuple[np.ndarray, np.ndarray]] | None:
    """The ``head+temperature+threshold`` option: the head refitted on the adapt part (:mod:`.head`), its
    temperature and operating point fitted on the cross-fitted out-of-fold logits; None (noted) when the adapt
    part cannot support a fit."""
    label = "+".join([*prefix, "head"])
    problem = head_fit_problem(y[fit_rows], keys[fit_rows])
    if problem:
        notes.append(f"{label}: not tried: {problem}")
        return None
    fitted = tune_head(model.head, feats[fit_rows], y[fit_rows], keys[fit_rows], run.card.task, seed=seed)
    refit = calibrate(run.model, fit_m, run.card, run.config, logits=fitted.oof_logits, finite_sample=True)
    with torch.no_grad():
        x = torch.as_tensor(np.ascontiguousarray(feats), dtype=torch.float32)
        logits = fitted.head(x).double().numpy().reshape(len(feats), -1)
    parts = [*prefix, "head", "temperature", "threshold"]
    fit = _Fit("+".join(parts), parts, with_bn, refit.temperature, thresholds_of(refit),
               note=f"L2-SP strength {fitted.strength:g} ({fitted.folds}-fold CV); "
                    f"{refit.calibration.get('reason', '')}".strip(),
               head={k: v.detach().cpu().clone() for k, v in fitted.head.state_dict().items()})
    return fit, (logits, ok)


def _site_pass(model: nn.Module, run: Run, site: Manifest, progress: bool, what: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the site: frozen features (what the head consumes), logits (the head on them), decoded mask."""
    tc = run.config.train
    out = run_model(model, site, run.card.input, output="features", batch_size=tc.batch_size, device=tc.device,
                    amp=tc.amp, cpu_bf16=tc.cpu_bf16, num_workers=tc.num_workers, cache_dir=run.cache_dir,
                    progress=progress, description=what)
    feats = np.asarray(out.outputs, dtype=np.float32)
    head = model.head
    with torch.no_grad():
        head.eval()
        dev_ = next(head.parameters()).device
        logits = head(torch.from_numpy(np.ascontiguousarray(feats)).to(dev_)).double().cpu().numpy()
    return feats, logits.reshape(len(site), -1), out.ok
