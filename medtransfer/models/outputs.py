"""What a model's logits mean: calibrated probabilities and decisions at the card's operating points.

The model card stores the learned state (temperature, thresholds); these functions apply it. They are the
one definition used by inference, evaluation, prediction and export, so a probability means the same
thing everywhere. Pure numpy/scipy: no torch.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.special import expit, log_softmax, softmax

from medtransfer.data.spec import TASKS
from medtransfer.models.card import ModelCard

logger = logging.getLogger(__name__)

#: The operating point used for a class the card has no threshold for (logged when it happens).
DEFAULT_THRESHOLD = 0.5


def apply_temperature(logits: np.ndarray, temperature: float, task: str) -> np.ndarray:
    """Probabilities from logits divided by a temperature (T = 1: uncalibrated).

    Args:
        logits: binary (N,) or (N, 1) (sigmoid); multiclass (N, K) (softmax); multilabel (N, K) (sigmoid).
        temperature: T > 0 (> 1 softens an overconfident model).
        task: ``binary``, ``multiclass`` or ``multilabel``.

    Returns:
        float64: binary P(positive) (N,); multiclass softmax (N, K), rows sum to 1; multilabel sigmoid (N, K).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    if task == "binary":
        return expit(z.reshape(-1))
    if task == "multiclass":
        return softmax(z, axis=1)
    return expit(z)


def scored_classes(card: ModelCard) -> list[str]:
    """The classes that get a probability column: the positive class (binary) or every class."""
    return [card.classes[1]] if card.task == "binary" else list(card.classes)


def probabilities(logits: np.ndarray, card: ModelCard, *, calibrated: bool = True) -> np.ndarray:
    """Probabilities (N, len(scored_classes)) from logits (N, K), with the card's temperature when asked.

    Computed in float64, so calibrated and raw probabilities stay exactly related.
    """
    lg = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    temperature = card.temperature if calibrated and card.temperature is not None else 1.0
    return np.asarray(apply_temperature(lg, temperature, card.task), dtype=np.float64).reshape(len(lg), -1)


def thresholds_of(card: ModelCard) -> dict[str, float]:
    """The card's operating point per scored class; :data:`DEFAULT_THRESHOLD` (logged) where it has none."""
    missing = [c for c in scored_classes(card) if c not in card.thresholds]
    if missing:
        logger.warning("the model card has no threshold for %s; using %.1f. Evaluate the run to choose them on "
                       "its validation split.", missing, DEFAULT_THRESHOLD)
    return {c: float(card.thresholds.get(c, DEFAULT_THRESHOLD)) for c in scored_classes(card)}


def decisions(p: np.ndarray, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Decisions at the card's operating points.

    Args:
        p: calibrated probabilities (N, len(scored_classes)); NaN rows (undecoded cases) give empty decisions.

    Returns:
        ``(flags, predicted)``: int (N, len(scored_classes)) 1/0 per scored class (``p >= threshold``), and the
        predicted label per case as text: binary → the class name at the threshold, multi-class → the arg-max
        class, multi-label → the ``;``-joined classes at or above their thresholds ("" for NaN rows).
    """
    classes = scored_classes(card)
    thr = thresholds_of(card)
    ok = ~np.isnan(p).any(axis=1)
    flags = np.zeros(p.shape, dtype=np.int64)
    for j, c in enumerate(classes):
        flags[:, j] = np.nan_to_num(p[:, j], nan=-1.0) >= thr[c]
    if card.task == "binary":
        predicted = np.where(flags[:, 0] == 1, card.classes[1], card.classes[0]).astype(object)
    elif card.task == "multiclass":
        predicted = np.asarray(card.classes, dtype=object)[np.argmax(np.nan_to_num(p, nan=-1.0), axis=1)]
    else:
        predicted = np.asarray([";".join(c for c, v in zip(classes, row, strict=True) if v) for row in flags],
                               dtype=object)
    predicted[~ok] = ""
    return flags, predicted


def ranking_scores(logits: np.ndarray, task: str) -> np.ndarray:
    """Scores that rank cases as the probabilities do, without saturating (for AUROC on model outputs).

    float32 sigmoids of logits beyond about ±17 (float64: ±37) are exactly 1.0 or 0.0, so confident cases tie
    and the AUROC of the same model depends on the precision it was read in. Sigmoid and log are monotone:
    binary and multi-label rank on the logits themselves, multi-class on float64 log-softmax.

    Returns:
        float64: binary (N,); multiclass / multilabel (N, K).
    """
    z = np.asarray(logits, dtype=np.float64)
    if task == "binary":
        return z.reshape(-1)
    if task == "multiclass":
        return log_softmax(z, axis=1)
    return z.reshape(len(z), -1)
