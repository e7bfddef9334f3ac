"""Sanity check for saliency maps: cascading model-parameter randomisation (Adebayo et al. 2018).

A saliency method that explains the *model* must give different maps once the model's learned weights are
gone. Starting from the output, the head and then each backbone stage (``model.stages()`` reversed) are
re-initialised in turn, cumulatively, on a **deep copy** of the model (the original is never touched); after
each step maps are computed for the same images and compared with the trained model's maps by Spearman
rank correlation (per image, on the flattened [0, 1] maps, then averaged over images).

- ``sanity_score = 1 - mean Spearman at full randomisation`` (every stage re-initialised), clipped to
  [0, 1]: near 1 the map depends on the weights (good), near 0 it is the same map whatever the weights (it
  shows the image, e.g. edges, not the model). A negative correlation (the randomised map ranks pixels
  roughly in reverse) also means the map changed with the weights, so it scores 1; the table keeps the
  signed values.
- ``passed = mean_spearman < 0.5``. Adebayo et al. report rank correlations near 0 for Grad-CAM and plain
  gradients after full randomisation and well above 0.5 for methods that act like edge detectors (guided
  backprop); 0.5 splits "mostly the image" from "mostly the model" and leaves room for the correlation that
  any map of the same image keeps through its shared input structure (the paper has no single threshold).

Departures from the paper: re-initialisation uses each module's own ``reset_parameters()`` (PyTorch's
default init; BatchNorm back to identity with fresh running statistics) instead of a truncated normal, and
parameters that no module owns (ViT's class token) are drawn from N(0, 0.02²). Maps compared are the
scaled maps (ReLU'd Grad-CAM, |gradients|), the paper's "absolute value" variant.

Occlusion is checked on its coarse pass (``occlusion_refine=0``: the same window, slid at a stride of one
window; see :mod:`medtransfer.explain.saliency`), for the trained and every randomised model alike, unless
``occlusion_refine`` is passed. Coarse-to-fine maps would refine different regions for each model, and that
difference in resolution alone would lower the correlation, i.e. make the check easier to pass than the
maps deserve; the coarse pass evaluates the same windows for every model, and costs a third of the
coarse-to-fine maps (this check computes maps ``1 + stages`` times).

Volumes: the same check on 3D maps, the rank correlation taken over every voxel. ``stages()`` of a volume model
lists its backbone stages (for ``slices`` the 2D backbone's, then the attention-MIL head), so the cascade is the
same. Occlusion's coarse pass is then 8 x 8 x 8 = 512 occluded volumes per map (see saliency.py), i.e.
``n_images x (1 + stages) x 514`` forward passes: use few volumes, or check Grad-CAM.

Constant maps. A pair where either map is constant (Grad-CAM with no positive evidence left; occlusion of
a randomised model whose output no patch changes) has no rank correlation. Such pairs are left out of the
mean and counted (``n_constant``); when the randomised model's maps are constant for most images at full
randomisation, there is nothing to compare and the check is **not assessed** (``status``), never passed:
counting those pairs as "no shared structure" made a degenerate check read as a perfect pass.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import nn

from medtransfer.explain.saliency import explain, model_and_task, occlusion_window
from medtransfer.inference import forward_batches
from medtransfer.progress import track

logger = logging.getLogger(__name__)

#: ``passed`` when the mean Spearman correlation at full randomisation is below this.
SANITY_THRESHOLD = 0.5

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SanityResult:
    """Outcome of the cascading randomisation check.

    Attributes:
        table: one row per cascade step: ``step`` (0 = head), ``randomised`` (the stage re-initialised at
            this step), ``mean_spearman``, ``std_spearman``, ``n_images``.
        mean_spearman: mean Spearman correlation at full randomisation (last row).
        sanity_score: ``1 - mean_spearman`` clipped to [0, 1] (higher = the map depends on the model).
        passed: ``mean_spearman < threshold`` (False when not assessed).
        threshold: the threshold used.
        method: the saliency method name.
        status: ``passed``, ``failed`` or ``not assessed`` (most map pairs constant at full randomisation).
        reason: why, in one sentence (for the report).
        maps: which maps were compared (e.g. occlusion's coarse pass and its window), for the table.
    """

    table: pd.DataFrame
    mean_spearman: float
    sanity_score: float
    passed: bool
    threshold: float
    method: str
    status: str = "passed"
    reason: str = ""
    maps: str = ""


def sanity_check(
    run_or_model: Any,
    images: torch.Tensor,
    *,
    method: str = "gradcam",
    target: int | None = None,
    explain_fn: ExplainFn | None = None,
    seed: int = 0,
    threshold: float = SANITY_THRESHOLD,
    progress: bool = False,
    **explain_kwargs: Any,
) -> SanityResult:
    """Cascading randomisation check of ``method`` on ``images``.

    Args:
        run_or_model: a Run or a :class:`Classifier` (needs ``stages()``); never modified.
        images: float tensor (N, C, H, W) or volumes (N, C, D, H, W), normalised as the model expects; a few
            suffice.
        method: a :func:`explain` method, used unless ``explain_fn`` is given.
        target: output index to explain; None: each image's target under the *trained* model (then kept
            fixed for the randomised models).
        explain_fn: ``fn(model, images, targets (N,)) -> maps (N, H, W)`` (volumes: (N, D, H, W)), to check any
            other method.
        seed: seeds the re-initialisation.
        threshold: see the module docstring.
        progress: show progress over the randomisation steps (each recomputes every map).
        **explain_kwargs: passed to :func:`explain` (e.g. ``n_steps``).

    Returns:
        :class:`SanityResult`.
    """
    model, _ = model_and_task(run_or_model)
    fn = explain_fn or _explain_fn(method, explain_kwargs)
    targets = _trained_targets(run_or_model, images, target)
    reference = fn(model, images, targets).detach()
    work = copy.deepcopy(model)
    stages = list(reversed(work.stages()))  # type: ignore[operator]
    names = ["head"] + [f"stage{i}" for i in range(len(stages) - 2, -1, -1)]
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        steps = track(list(zip(stages, names, strict=True)), f"sanity check ({method})", enabled=progress,
                      unit="randomisation steps")
        for step, (stage, name) in enumerate(steps):
            randomise(stage)
            rho = spearman_per_image(reference, fn(work, images, targets).detach())
            defined = rho[np.isfinite(rho)]
            rows.append({"step": step, "randomised": name,
                         "mean_spearman": float(np.mean(defined)) if defined.size else float("nan"),
                         "std_spearman": float(np.std(defined)) if defined.size else float("nan"),
                         "n_images": len(rho), "n_constant": int(len(rho) - defined.size)})
    table = pd.DataFrame(rows)
    last = table.iloc[-1]
    mean_rho = float(last["mean_spearman"])
    name = method if explain_fn is None else getattr(explain_fn, "__name__", "custom")
    if not last["n_constant"] * 2 < last["n_images"]:
        status = "not assessed"
        reason = (f"the maps were constant for {int(last['n_constant'])} of {int(last['n_images'])} images once the "
                  "weights were randomised, so there is nothing to compare; check with another --method")
    else:
        status = "passed" if mean_rho < threshold else "failed"
        reason = (f"mean Spearman correlation with the trained model's maps at full randomisation {mean_rho:.2f} "
                  f"({'below' if status == 'passed' else 'not below'} {threshold:.2f}"
                  + (f"; {int(last['n_constant'])} constant map(s) left out" if last["n_constant"] else "") + ")")
    score = float(np.clip(1.0 - mean_rho, 0.0, 1.0)) if status != "not assessed" else float("nan")
    result = SanityResult(table=table, mean_spearman=mean_rho, sanity_score=score, passed=status == "passed",
                          threshold=threshold, method=name, status=status, reason=reason,
                          maps=_maps_compared(name, images, explain_kwargs) if explain_fn is None else name)
    logger.info("sanity check (%s): %s: %s", result.method, status, reason)
    return result


def _explain_fn(method: str, kwargs: dict[str, Any]) -> ExplainFn:
    if method == "occlusion":
        kwargs = {"occlusion_refine": 0.0, **kwargs}  # the same windows for every model (module docstring)

    def fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return explain(model, images, method=method, target=_one_target(targets), **kwargs).maps[:, 0]

    return fn


def _maps_compared(method: str, images: torch.Tensor, kwargs: dict[str, Any]) -> str:
    """One line saying which maps the check compared (occlusion: which pass, and its window)."""
    if method != "occlusion":
        return f"{method} maps"
    window = " x ".join(str(w) for w in occlusion_window(images.shape[2:]))
    unit = "px" if images.ndim == 4 else "voxels"
    refine = kwargs.get("occlusion_refine", 0.0)  # _explain_fn's default for occlusion
    if refine is not None and float(refine) == 0:
        return f"occlusion coarse pass (window {window} {unit}, stride ~1 window), same windows for every model"
    shown = "default" if refine is None else f"{float(refine):g}"
    return f"occlusion coarse-to-fine (window {window} {unit}, occlusion_refine={shown})"


def _one_target(targets: torch.Tensor) -> int:
    uniq = targets.unique().tolist()
    if len(uniq) != 1:
        raise ValueError("sanity_check explains one target for all images; pass target=<output index>")
    return int(uniq[0])


def _trained_targets(run_or_model: Any, images: torch.Tensor, target: int | None) -> torch.Tensor:
    from medtransfer.explain.saliency import prepared, resolve_targets

    model, task = model_and_task(run_or_model)
    if target is not None:
        return torch.full((len(images),), int(target), dtype=torch.long)
    with prepared(model):
        logits, _ = forward_batches(model, [(images.float(), None)], device=next(model.parameters()).device)
        return resolve_targets(logits, None, task)[:, 0]


def randomise(module: nn.Module) -> None:
    """Re-initialise ``module`` in place: ``reset_parameters()`` where defined, N(0, 0.02²) otherwise."""
    covered: set[int] = set()
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):  # BatchNorm's also resets its running statistics
            reset()
            covered.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in covered:
                p.normal_(0.0, 0.02)


def spearman_per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (N, ...) (flattened); NaN where either map is constant."""
    x = a.reshape(len(a), -1).cpu().numpy()
    y = b.reshape(len(b), -1).cpu().numpy()
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            out[i] = float(spearmanr(x[i], y[i]).statistic)
    undefined = int(np.isnan(out).sum())
    if undefined:
        logger.info("%d of %d map pairs were constant (no rank correlation; left out)", undefined, len(x))
    return out
