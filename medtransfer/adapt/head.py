"""Fine-tuning a run's classification head on a few labelled cases of a new site (issue 19, item 3).

The backbone stays frozen: the head is refitted on the site's frozen features (pooled (N, F), or per-slice
(N, S, F) for 2.5D volume models, whose attention pooling is part of the head). With 50-200 labelled cases a
head trained from the site alone would forget what training taught it, so the fit starts from the trained head and
adds an L2-SP penalty (Li, Grandvalet & Davoine 2018, "Explicit inductive bias for transfer learning"):
``loss + lambda * sum((w - w_trained) ** 2)``, which pulls the weights back towards the trained ones. ``lambda`` is
chosen from :data:`L2SP_GRID` by patient-grouped K-fold cross-validation on the labelled cases (the out-of-fold
log loss); the grid includes large values, so a site that gives the head nothing to learn ends with a head close
to the trained one. The out-of-fold logits at the chosen ``lambda`` are returned too: the caller fits temperature
and operating point on them, never on logits of cases the head was trained on. The head kept is the average of
the K fold heads (cross-fitting's ensemble), so new cases are scored on the same scale as those out-of-fold
logits; a head refitted on all cases is more confident than the fold heads, and an operating point fitted on the
out-of-fold logits then misses its target on new cases (measured: rest-of-site sensitivity 0.75 against 0.9).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medtransfer.stats.bootstrap import cluster_codes

logger = logging.getLogger(__name__)

#: L2-SP strengths tried (times the summed squared change of the head's parameters, added to the mean loss).
L2SP_GRID = (1e-3, 1e-2, 1e-1, 1.0)
#: Full-batch Adam steps per fit, and their learning rate.
STEPS = 150
LR = 1e-2
#: At most this many folds; fewer when there are fewer patients per class.
MAX_FOLDS = 5
#: Fewest labelled cases, and fewest cases of each outcome per scored class, for a head fit to be tried.
MIN_CASES = 20
MIN_PER_OUTCOME = 5


@dataclass
class HeadFit:
    """A head refitted on a site's labelled cases.

    Attributes:
        head: the refitted head (eval mode, on the CPU).
        oof_logits: float64 (N, K) out-of-fold logits of the labelled cases at the chosen strength.
        strength: the chosen L2-SP ``lambda``; ``cv_loss``: out-of-fold loss per strength tried.
        folds: the number of patient-grouped folds.
    """

    head: nn.Module
    oof_logits: np.ndarray
    strength: float
    cv_loss: dict[float, float]
    folds: int


def head_fit_problem(y: np.ndarray, keys: np.ndarray) -> str | None:
    """Why a head cannot be fitted on these labels (``y``: (N, K) one-vs-rest 0/1/NaN), or None when it can."""
    if len(y) < MIN_CASES:
        return f"{len(y)} labelled cases in the adapt part; at least {MIN_CASES} are needed"
    for j in range(y.shape[1]):
        known = np.isfinite(y[:, j])
        pos, neg = int((y[known, j] == 1).sum()), int((y[known, j] == 0).sum())
        if min(pos, neg) < MIN_PER_OUTCOME:
            return (f"class {j} has {pos} positive and {neg} negative case(s) in the adapt part; at least "
                    f"{MIN_PER_OUTCOME} of each are needed")
    if len(np.unique(keys)) < 4:
        return "fewer than 4 patients in the adapt part"
    return None


def tune_head(head: nn.Module, features: np.ndarray, y: np.ndarray, keys: np.ndarray, task: str, *,
              seed: int = 0, grid: tuple[float, ...] = L2SP_GRID) -> HeadFit:
    """Refit ``head`` on frozen ``features`` with an L2-SP pull towards its trained weights (module docstring).

    Args:
        head: the run's trained head (left untouched; a copy is fitted).
        features: float (N, F) or (N, S, F) frozen features, what ``head`` consumes.
        y: (N, K) one-vs-rest targets, 0/1 and NaN for unknown (masked); multi-class: one-hot rows.
        keys: (N,) patient keys; folds never split a patient.
        task: ``binary``, ``multilabel`` or ``multiclass``.
        seed: seed of the folds.
        grid: the L2-SP strengths tried.

    Returns:
        :class:`HeadFit`.
    """
    x = torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32)
    target = torch.as_tensor(np.asarray(y, dtype=np.float32))
    base = copy.deepcopy(head).float().cpu().eval()
    folds = _folds(keys, y, task, seed)
    k = int(folds.max()) + 1
    cv: dict[float, float] = {}
    oof: dict[float, np.ndarray] = {}
    heads: dict[float, list[nn.Module]] = {}
    for lam in grid:
        out = np.zeros(tuple(y.shape), dtype=np.float64)
        heads[lam] = []
        for f in range(k):
            tr, te = folds != f, folds == f
            fitted = _fit(base, x[tr], target[tr], task, lam, seed)
            heads[lam].append(fitted)
            with torch.no_grad():
                out[te] = fitted(x[te]).double().numpy().reshape(int(te.sum()), -1)
        oof[lam] = out
        cv[lam] = _loss(torch.from_numpy(out), target.double(), task).item()
    best = min(grid, key=lambda lam: (cv[lam], -lam))  # ties: the stronger pull (closer to the trained head)
    # The head kept is the fold heads' average (for a linear head, exactly the mean of their logits): new cases
    # are then scored on the scale of the out-of-fold logits that temperature and threshold are fitted on. One
    # head refitted on all cases would be fitted on 1/(k-1) more data, and more confident than the fold heads.
    final = _average(heads[best])
    logger.info("head fine-tuning: L2-SP strength %g (out-of-fold loss %s, %d folds)", best,
                ", ".join(f"{lam:g}: {v:.4f}" for lam, v in cv.items()), k)
    return HeadFit(final, oof[best], float(best), cv, k)


def _average(heads: list[nn.Module]) -> nn.Module:
    """A head whose parameters and buffers are the mean of ``heads``' (same architecture)."""
    out = copy.deepcopy(heads[0])
    states = [h.state_dict() for h in heads]
    mean = {k: (torch.stack([s[k].float() for s in states]).mean(dim=0).to(v.dtype) if v.is_floating_point() else v)
            for k, v in states[0].items()}
    out.load_state_dict(mean)
    return out.eval()


def _folds(keys: np.ndarray, y: np.ndarray, task: str, seed: int) -> np.ndarray:
    """A fold number per case: patients dealt round-robin within strata of their first label (seeded)."""
    codes, n = cluster_codes(np.asarray(keys).astype(str), len(keys))
    yy = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=-1)
    stratum_case = yy.argmax(axis=1) if task == "multiclass" else yy[:, 0]
    stratum = np.zeros(n)
    stratum[codes[::-1]] = stratum_case[::-1]  # each patient's first case decides its stratum
    rng = np.random.default_rng(seed)
    per_class = min(int((stratum == s).sum()) for s in np.unique(stratum))
    k = int(max(2, min(MAX_FOLDS, per_class)))
    fold_of = np.zeros(n, dtype=np.int64)
    offset = 0
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        members = members[rng.permutation(len(members))]
        fold_of[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return fold_of[codes]


def _loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multiclass":
        return F.cross_entropy(logits, y.argmax(dim=1))
    known = torch.isfinite(y)
    return F.binary_cross_entropy_with_logits(logits[known], y[known])


def _fit(base: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, lam: float, seed: int) -> nn.Module:
    """Full-batch Adam from the trained weights with the L2-SP penalty; eval mode throughout (no dropout)."""
    torch.manual_seed(seed)
    head = copy.deepcopy(base).eval()
    params = list(head.parameters())
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=LR)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        out = head(x).reshape(len(x), -1)
        pull = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
        loss = _loss(out, y, task) + lam * pull
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return head.eval()
