"""Calibration at the end of training: temperature and operating points, learned on the validation split.

Both are learned state (stored in the model card, applied unchanged to test and external data). Two rules:

- **A temperature is kept only when it helps.** Temperature scaling minimises the validation negative
  log-likelihood, so on the cases it was fitted on it can only look better; that says nothing about new
  patients, and on a small or separable validation split it can make calibration worse (seen on real chest
  X-rays: test ECE 0.057 -> 0.062). We therefore judge it out of sample: the validation patients are split
  in two folds, a temperature fitted on each fold scores the other, and the temperature is applied only if
  these cross-fitted probabilities have a lower NLL *and* an ECE no worse than the uncalibrated ones. With
  too few validation cases for two folds (< 40 or one outcome per fold) the in-sample figures decide. The
  card's ``calibration`` records the decision, the reason and the figures; ``temperature`` stays None when
  it is not applied.
- **Operating points** (``eval.threshold``: Youden, or a target sensitivity/specificity) are chosen on the
  validation probabilities the model will actually output (calibrated or not).
"""

from __future__ import annotations

import logging
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from medtransfer.config import RunConfig
from medtransfer.data.manifest import Manifest
from medtransfer.inference import run_model
from medtransfer.models.card import ModelCard
from medtransfer.models.outputs import apply_temperature, probabilities, scored_classes
from medtransfer.stats.calibration import T_BOUNDS, ece, fit_temperature
from medtransfer.stats.metrics import targets_to_matrix
from medtransfer.stats.thresholds import choose_threshold

logger = logging.getLogger(__name__)

#: Fewer validation cases than this: the temperature is judged in sample (no cross-fitting).
MIN_CROSS_FIT = 40


def one_vs_rest(targets: np.ndarray, task: str, n_classes: int) -> np.ndarray:
    """Targets as float (N, len(scored_classes)) 1/0/NaN, one column per scored class (binary: the positive)."""
    m = targets_to_matrix(targets, task, n_classes)
    return m[:, 1:] if task == "binary" else m


def calibrate(model: torch.nn.Module, manifest_val: Manifest, card: ModelCard, cfg: RunConfig, *,
              cache_dir: str | Path | None = None, progress: bool = False,
              logits: np.ndarray | None = None, finite_sample: bool = False) -> ModelCard:
    """Decide the temperature and choose operating points on the validation split; returns an updated card.

    Args:
        model: the trained classifier (best weights).
        manifest_val: the validation cases (never test or external data).
        card: the model card to update (not modified; a copy is returned).
        cfg: the run config (``eval.threshold``, ``eval.target``, ``train.batch_size``, ``train.device``).
        cache_dir: decoded-image cache (training's cache is warm for the validation split).
        progress: progress display.
        logits: the validation logits when training already has them (a linear probe's head on its cached
            frozen features, in manifest order); None runs the model over the validation images.
        finite_sample: sensitivity/specificity targets with the finite-sample rank rule
            (:func:`~medtransfer.stats.thresholds.choose_threshold`); site adaptation uses it.

    Returns:
        A copy of ``card`` with ``temperature`` (None when not applied), ``calibration`` (the decision and its
        figures) and ``thresholds`` ({class: threshold}; binary: the positive class). A class without both
        outcomes in validation keeps 0.5 (logged); with no validation cases the card is returned unchanged.
    """
    if len(manifest_val) == 0:
        logger.warning("no validation cases: thresholds stay at %s and no temperature is fitted", card.thresholds)
        return card.model_copy(update={"calibration": {"applied": False, "reason": "no validation split"}})
    if logits is not None and len(logits) == len(manifest_val):
        ok = np.ones(len(manifest_val), dtype=bool)
        targets = np.asarray(manifest_val.targets())
    else:
        out = run_model(model, manifest_val, card.input, batch_size=cfg.train.batch_size, device=cfg.train.device,
                        amp=cfg.train.amp, cpu_bf16=cfg.train.cpu_bf16, num_workers=cfg.train.num_workers,
                        cache_dir=cache_dir, progress=progress, description="calibrating")
        ok = out.ok
        logits, targets = out.outputs[ok], out.targets[ok]
    keys = manifest_val.df["patient_key"].astype(str).to_numpy()[ok]
    decision = decide_temperature(logits, targets, keys, card.task)
    fitted = card.model_copy(update={"temperature": decision["temperature"] if decision["applied"] else None,
                                     "calibration": decision})
    p = probabilities(logits, fitted)
    y = one_vs_rest(targets, card.task, len(card.classes))
    chosen: dict[str, float] = {}
    for j, c in enumerate(scored_classes(card)):
        known = ~np.isnan(y[:, j])
        yc, pc = y[known, j], p[known, j]
        if yc.size == 0 or yc.min() == yc.max():
            logger.warning("class '%s' has %s in the validation split; its threshold stays 0.5",
                           c, "no cases" if yc.size == 0 else "only one outcome")
            chosen[c] = 0.5
            continue
        thr = float(choose_threshold(yc, pc, method=cfg.eval.threshold, target=cfg.eval.target,
                                     finite_sample=finite_sample))
        chosen[c] = thr if np.isfinite(thr) else 0.5
    logger.info("calibrated on %d validation cases: temperature %s (%s), thresholds %s", int(ok.sum()),
                f"{decision['temperature']:.3f}" if decision["applied"] else "not applied", decision["reason"], chosen)
    return ModelCard.model_validate({**fitted.model_dump(), "thresholds": chosen})


def decide_temperature(logits: np.ndarray, targets: np.ndarray, patient_keys: np.ndarray, task: str) -> dict:
    """Fit a temperature and decide whether to apply it (module docstring).

    Args:
        logits: validation logits (N, K). targets: as ``Manifest.targets()`` gives them. patient_keys: (N,).
        task: binary / multiclass / multilabel.

    Returns:
        ``{"applied", "temperature", "reason", "judged" ("cross-fitted"/"in-sample"), "ece_before",
        "ece_after", "nll_before", "nll_after", "n"}`` (ECE: mean over scored classes; NLL per case).
    """
    base = {"method": "temperature scaling", "n": int(len(logits)), "applied": False, "temperature": 1.0}
    temperature = _fit(logits, targets, task)
    if temperature is None:
        return {**base, "reason": "not fitted: the validation split lacks one of the outcomes, or the fit ran "
                                  "onto its bound (a separable or uninformative validation split)"}
    y = one_vs_rest(targets, task, logits.shape[1] if task != "binary" else 2)
    folds = _folds(patient_keys, y)
    p_raw = _probs(logits, 1.0, task)
    if folds is not None:
        p_cal = np.empty_like(p_raw)
        for train_idx, test_idx in folds:
            t_fold = _fit(logits[train_idx], targets[train_idx], task) or 1.0
            p_cal[test_idx] = _probs(logits[test_idx], t_fold, task)
        judged = "cross-fitted (2 patient folds)"
    else:
        p_cal = _probs(logits, temperature, task)
        judged = "in-sample (too few validation cases for cross-fitting)"
    figures = {"ece_before": _mean_ece(y, p_raw), "ece_after": _mean_ece(y, p_cal),
               "nll_before": _nll(y, p_raw, task), "nll_after": _nll(y, p_cal, task)}
    helps = figures["nll_after"] < figures["nll_before"] and figures["ece_after"] <= figures["ece_before"] + 1e-12
    if helps:
        reason = (f"applied: validation ECE {figures['ece_before']:.3f} -> {figures['ece_after']:.3f}, NLL "
                  f"{figures['nll_before']:.3f} -> {figures['nll_after']:.3f} ({judged})")
    else:
        worse = (["ece"] if figures["ece_after"] > figures["ece_before"] + 1e-12 else []) + (
            ["nll"] if figures["nll_after"] >= figures["nll_before"] else [])
        reason = (f"not applied: it did not improve validation {' or '.join(w.upper() for w in worse)} (ECE "
                  f"{figures['ece_before']:.3f} -> {figures['ece_after']:.3f}, NLL {figures['nll_before']:.3f} -> "
                  f"{figures['nll_after']:.3f}, {judged}); probabilities are the model's own")
    return {**base, **{k: float(v) for k, v in figures.items()}, "applied": bool(helps),
            "temperature": float(temperature), "judged": judged, "reason": reason}


def _fit(logits: np.ndarray, targets: np.ndarray, task: str) -> float | None:
    """The NLL-optimal temperature, or None when it is not meaningful (one outcome; on a search bound)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = float(fit_temperature(logits, targets, task))
    lo, hi = T_BOUNDS
    if caught and any("skipped" in str(w.message) for w in caught):
        return None
    if not np.isfinite(t) or not lo * 1.01 < t < hi * 0.99:
        # On the bound: a separable (T -> 0) or uninformative (T -> inf) split; sharpening 20x would also
        # saturate probabilities to exactly 0/1 and destroy the ranking AUROC needs.
        return None
    return t


def _folds(keys: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Two patient-disjoint folds (deterministic), or None when too small or an outcome is missing in one."""
    if len(keys) < MIN_CROSS_FIT:
        return None
    uniq = np.unique(keys)
    order = np.argsort([zlib.crc32(str(k).encode()) for k in uniq])  # stable (hash() is salted per process)
    fold_of = dict(zip(uniq[order], np.arange(len(uniq)) % 2, strict=True))
    f = np.array([fold_of[k] for k in keys])
    folds = []
    for k in (0, 1):
        train_idx, test_idx = np.flatnonzero(f != k), np.flatnonzero(f == k)
        yt = y[train_idx]
        if not any(np.nanmin(yt[:, j]) < np.nanmax(yt[:, j]) for j in range(y.shape[1]) if np.isfinite(yt[:, j]).any()):
            return None
        folds.append((train_idx, test_idx))
    return folds


def _probs(logits: np.ndarray, t: float, task: str) -> np.ndarray:
    p = np.asarray(apply_temperature(logits, t, task), dtype=float)
    return p.reshape(len(logits), -1)


def _mean_ece(y: np.ndarray, p: np.ndarray) -> float:
    vals = []
    for j in range(min(y.shape[1], p.shape[1])):
        known = np.isfinite(y[:, j])
        if known.any():
            vals.append(ece(y[known, j], p[known, j]))
    return float(np.mean(vals)) if vals else float("nan")


def _nll(y: np.ndarray, p: np.ndarray, task: str) -> float:
    eps = 1e-12
    if task == "multiclass":
        return float(-np.mean(np.log(np.clip(np.sum(y * p[:, : y.shape[1]], axis=1), eps, 1))))
    known = np.isfinite(y)
    q = np.clip(p[:, : y.shape[1]], eps, 1 - eps)
    ll = np.where(known, np.nan_to_num(y) * np.log(q) + (1 - np.nan_to_num(y)) * np.log(1 - q), 0.0)
    return float(-ll.sum() / max(known.sum(), 1))
