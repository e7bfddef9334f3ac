"""``evaluate``: one inference pass, then metrics with CIs, calibration, operating points and subgroup gaps.

Operating points and temperature are learned on the VALIDATION split only, by :func:`calibrate`, which
training calls once the best weights are restored and stores in the model card. Evaluation applies them as
they are: a test split or an external folder never re-tunes a threshold or a temperature (that would
report an optimistic operating point nobody could have chosen in advance).

Multi-class and multi-label tasks are evaluated one-vs-rest per class (``true_<class>`` against
``p_<class>``), plus a ``macro`` row (the mean of the class rows, without a CI). Binary tasks are evaluated
for the positive class (``classes[1]``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer import distributed
from medtransfer._version import __version__
from medtransfer.checks import evaluation_checks
from medtransfer.commands import Commands
from medtransfer.config import DataConfig
from medtransfer.data.discovery import index_scans
from medtransfer.data.manifest import Manifest
from medtransfer.errors import ManifestError, RunDirError
from medtransfer.evaluation.result import EvaluationResult
from medtransfer.evaluation.subgroups import GAP_COLUMNS, TABLE_COLUMNS, subgroup_gaps, subgroup_table
from medtransfer.models.card import ModelCard
from medtransfer.models.outputs import scored_classes, thresholds_of
from medtransfer.run_dir import Run, load_run
from medtransfer.stats.bootstrap import metric_intervals
from medtransfer.stats.calibration import brier, ece, reliability_curve
from medtransfer.stats.metrics import BINARY_METRICS, binary_metrics
from medtransfer.training.calibrate import calibrate

logger = logging.getLogger(__name__)



# -- evaluate -------------------------------------------------------------------------------------
def evaluate(
    run_or_model: Run | str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    labels: str | os.PathLike[str] | None = None,
    split: str | None = None,
    subgroups: Sequence[str] | None = None,
    n_boot: int | None = None,
    ci: float | None = None,
    min_group_size: int | None = None,
    intersections: Sequence[Sequence[str]] = (),
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    seed: int = 0,
) -> EvaluationResult:
    """Evaluate a trained run on a split of its own data or on an external folder, and save the result.

    Args:
        run_or_model: a :class:`~medtransfer.training.run.Run` or its directory.
        data: None evaluates ``split`` of the run's manifest; a folder is indexed like training data
            (class sub-folders or ``labels``) and ALL its cases are evaluated, with split ``external``.
        labels: labels CSV for ``data`` (multi-label: columns named after the card's classes).
        split: the run's split to evaluate when ``data`` is None (``test``, ``val`` or ``train``).
        subgroups: manifest columns to break metrics down by; absent ones are listed in ``meta["warnings"]``.
        n_boot, ci: bootstrap resamples (by patient) and confidence level; ``n_boot=0`` gives no CIs.
        min_group_size: smaller subgroups are listed but not assessed.

            ``split``, ``subgroups``, ``n_boot``, ``ci`` and ``min_group_size`` left as None take the run's
            ``eval`` config (``config.yaml``; defaults test, sex/age_band/site, 1000, 0.95, 10), so a run
            trained with ``--set eval.n_boot=2000`` is evaluated that way without repeating it.
        intersections: attribute combinations, e.g. ``[("sex", "age_band")]``.
        out_dir: where ``evaluation.json`` + ``predictions.csv`` go. Default: the run directory (split
            ``test``), ``<run>/split-<name>`` (other splits), ``<run>/external/<folder name>`` (external data).
        batch_size, device: inference settings.
        progress: progress bars on stderr.
        seed: bootstrap seed.

    Returns:
        The :class:`EvaluationResult` (also saved; ``result.saved_to`` is the folder).

    Raises:
        RunDirError: not a run directory, or no manifest to take ``split`` from.
        ManifestError: an empty split, or external labels outside the card's classes.

    Examples:
        >>> result = evaluate("runs/cxr1", "external_site/", labels="external_site/labels.csv")  # doctest: +SKIP
        >>> result.overall[["class", "auroc", "auroc_lo", "auroc_hi"]]  # doctest: +SKIP
    """
    run = run_or_model if isinstance(run_or_model, Run) else load_run(run_or_model)
    defaults = run.config.eval
    split = defaults.split if split is None else split
    subgroups = tuple(defaults.subgroups) if subgroups is None else tuple(subgroups)
    n_boot = defaults.n_boot if n_boot is None else int(n_boot)
    ci = defaults.ci if ci is None else float(ci)
    min_group_size = defaults.min_group_size if min_group_size is None else int(min_group_size)
    run, source = _with_operating_points(run, progress)
    # under torchrun: rank 0 indexes an external folder; inference is sharded; rank 0 computes and writes
    manifest, name, default_out = distributed.main_first(lambda: _cases(run, data, labels, split, progress))
    t0 = time.perf_counter()
    preds = run.predict(manifest, batch_size=batch_size, device=device, progress=progress)
    t1 = time.perf_counter()
    held: dict[str, EvaluationResult] = {}

    def finish() -> Path:
        held["result"] = _finish(run, preds, manifest, name, data=data, split=split, source=source,
                                 subgroups=subgroups, intersections=intersections, n_boot=n_boot, ci=ci,
                                 min_group_size=min_group_size, seed=seed, timing=(t0, t1),
                                 out=Path(out_dir) if out_dir is not None else default_out)
        return held["result"].saved_to  # type: ignore[return-value]

    saved = distributed.main_first(finish)
    return held["result"] if distributed.is_main() else EvaluationResult.load(saved)


def _finish(run: Run, preds: pd.DataFrame, manifest: Manifest, name: str, *, data: Any, split: str, source: str,
            subgroups: Sequence[str], intersections: Sequence[Sequence[str]], n_boot: int, ci: float,
            min_group_size: int, seed: int, timing: tuple[float, float], out: Path) -> EvaluationResult:
    """Statistics, checks and files of an evaluation, from its predictions."""
    t0, t1 = timing
    attrs, inter, notes = _present(preds, subgroups, intersections)
    tables = compute_tables(preds, run.card, attributes=attrs, intersections=inter, n_boot=n_boot, ci=ci,
                            min_group_size=min_group_size, seed=seed)
    tables["thresholds"] = _threshold_table(run, source)
    meta = _meta(run, preds, manifest, name, split="external" if data is not None else split,
                 notes=notes, settings={"n_boot": n_boot, "ci": ci, "seed": seed,
                                              "min_group_size": min_group_size, "subgroups": attrs,
                                              "intersections": [list(i) for i in inter]})
    meta["timing"] = {"inference_s": round(t1 - t0, 3), "statistics_s": round(time.perf_counter() - t1, 3)}
    meta["not_evaluable"] = not_evaluable(preds[preds["error"] == ""], run.card)
    meta["warnings"] += [f"class '{c}' is not evaluable on these cases: {why}; its metrics are blank."
                         for c, why in meta["not_evaluable"].items()]
    result = EvaluationResult(**tables, predictions=preds, meta=meta)
    commands = Commands.for_run(run.path, [c for c in preds.columns if preds[c].notna().any()])
    meta["checks"] = [c.to_dict() for c in evaluation_checks(result, commands)]
    if data is not None:  # the external cases' manifest + quarantine.csv: working files beside the result
        manifest.save(out)
    result.save(out)
    logger.info("evaluation written to %s", result.saved_to)
    return result


def _with_operating_points(run: Run, progress: bool) -> tuple[Run, str]:
    """The run, with thresholds chosen on its validation split if its card has none (card file untouched)."""
    if all(c in run.card.thresholds for c in scored_classes(run.card)):
        return run, "validation split (chosen at training)"
    val = run.manifest.split("val") if run.manifest is not None and "split" in run.manifest.df else None
    if val is None or len(val) == 0:
        return run, "default 0.5 (the run has no validation split)"
    card = calibrate(run.model, val, run.card, run.config, cache_dir=run.cache_dir, progress=progress)
    return dataclasses.replace(run, card=card), "validation split (chosen at evaluation)"


def _cases(run: Run, data: Any, labels: Any, split: str, progress: bool) -> tuple[Manifest, str, Path]:
    """(cases to evaluate, data source name, default output folder)."""
    if data is None:
        if run.manifest is None:
            raise RunDirError(f"{run.path}: no manifest.csv, so there is no '{split}' split to evaluate; pass "
                              "--data FOLDER to evaluate external data.")
        cases = run.manifest.split(split)
        if len(cases) == 0:
            raise ManifestError(f"the run's '{split}' split has no cases; choose another --split (test, val, "
                                "train) or pass --data FOLDER.")
        out = run.path if split == "test" else run.path / f"split-{split}"
        return cases, run.manifest.data_dir.name, out
    return _external(run, Path(data), labels, progress)


def _external(run: Run, folder: Path, labels: Any, progress: bool) -> tuple[Manifest, str, Path]:
    """Index an external folder; every case is evaluated (split ``external``) with the card's classes."""
    card = run.card
    if card.task == "multilabel" and labels is None:
        raise ManifestError(f"{folder.name}: this model is multi-label; pass --labels CSV with a 'path' column "
                            f"and 0/1/blank columns {card.classes}.")
    manifest = index_external(run, folder, labels, progress)
    return manifest, manifest.data_dir.name, run.path / "external" / manifest.data_dir.name


def index_external(run: Run, folder: Path, labels: Any, progress: bool, *, split: str = "external",
                   require_labels: bool = True) -> Manifest:
    """A folder from outside the run, indexed as the run's data is, with the card's classes and one ``split``.

    Every case belongs to ``split`` (splits of the run mean nothing there); labels outside the card's classes
    are refused. ``require_labels=False`` accepts a folder without labels (an unlabelled inventory, returned as
    indexed), as ``medtransfer adapt`` does.
    """
    card = run.card
    cfg = DataConfig(val_fraction=0, test_fraction=0, age_bands=run.config.data.age_bands)
    columns, unscored = _external_label_columns(card, folder, labels)
    m = index_scans(folder, labels=labels, label_columns=columns, config=cfg, spatial_dims=card.input.spatial_dims,
                    require_labels=require_labels, progress=progress)
    if m.task == "unlabelled":
        return m
    if unscored is not None:  # classes this data has no positive for: kept (0/blank), reported not evaluable
        for c, values in unscored.items():
            m.df[c] = m.df["path"].map(values).astype(float)
    if card.task != "multilabel":
        unknown = sorted(set(m.df["label"].dropna().astype(str)) - set(card.classes))
        if unknown:
            raise ManifestError(f"{folder.name}: labels {unknown} are not classes of this model "
                                f"({card.classes}); rename them or evaluate only the known classes.")
    df = m.df.assign(split=split)
    kept = [w for w in m.warnings if not w.startswith("split '")]  # splits mean nothing for external data
    return Manifest(df, list(card.classes), card.task, m.data_dir, kept, m.quarantine)


def _external_label_columns(card: ModelCard, folder: Path, labels: Any
                            ) -> tuple[list[str] | None, dict[str, pd.Series] | None]:
    """(label columns to index, {class: 0/1/NaN by path} for the model's classes without a positive there).

    A multi-label model evaluated on another dataset (a public dataset's harmonised CSV) meets classes that
    data never labels (every cell blank) or never finds: indexing would refuse them, yet the other classes can
    be evaluated; those are kept and reported "not evaluable" (:func:`not_evaluable`), never scored 0.5.
    """
    if card.task != "multilabel" or labels is None:
        return (list(card.classes) if card.task == "multilabel" else None), None
    from medtransfer.data.labels import read_labels_csv

    table = read_labels_csv(labels, folder, label_columns=list(card.classes))
    positive = [c for c in card.classes if (table.df[c] == 1).any()]
    if not positive:
        raise ManifestError(f"{table.name}: no class of this model ({card.classes}) has a positive (1) case; "
                            "nothing can be evaluated. Check the label columns.")
    by_path = table.df.set_index("path")
    return positive, {c: by_path[c] for c in card.classes if c not in positive}


def not_evaluable(preds: pd.DataFrame, card: ModelCard) -> dict[str, str]:
    """Classes whose AUROC cannot be computed on these cases, with the reason (no known label, no positive or no
    negative case)."""
    out = {}
    for c in scored_classes(card):
        known = preds[f"true_{c}"].dropna() if f"true_{c}" in preds.columns else pd.Series(dtype=float)
        if known.empty:
            out[c] = "no labelled case (the data does not label it)"
        elif not (known == 1).any():
            out[c] = "no positive case"
        elif not (known == 0).any():
            out[c] = "no negative case"
    return out


def _present(preds: pd.DataFrame, subgroups: Sequence[str], intersections: Sequence[Sequence[str]]
             ) -> tuple[list[str], list[tuple[str, ...]], list[str]]:
    """(requested attributes present in the data, usable intersections, warnings for the rest)."""
    have = [a for a in subgroups if a in preds.columns and preds[a].notna().any()]
    missing = [a for a in subgroups if a not in have]
    notes = [f"subgroup '{a}' is not in the data (no value for any case); it was skipped." for a in missing]
    inter = [tuple(i) for i in intersections if all(a in preds.columns and preds[a].notna().any() for a in i)]
    notes += [f"intersection {list(i)} skipped: an attribute is not in the data."
                 for i in intersections if tuple(i) not in inter]
    return have, inter, notes


# -- the statistics tables ----------------------------------------------------------------------------
def compute_tables(preds: pd.DataFrame, card: ModelCard, *, attributes: Sequence[str],
                   intersections: Sequence[tuple[str, ...]] = (), n_boot: int = 1000, ci: float = 0.95,
                   min_group_size: int = 10, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Overall, per-class, subgroup, gap and calibration tables from a predictions table.

    Args:
        preds: the predictions table (``true_<c>``, ``p_<c>``, ``p_raw_<c>``, ``patient_key``, subgroups).
        card: the model card (task, classes, thresholds, temperature).
        attributes: subgroup columns present in ``preds``.
        intersections, n_boot, ci, min_group_size, seed: as for :func:`evaluate`.

    Returns:
        dict with ``overall``, ``per_class``, ``by_group``, ``gaps``, ``calibration``, ``reliability``.
    """
    thr = thresholds_of(card)
    parts: dict[str, list[pd.DataFrame]] = {k: [] for k in ("by_group", "gaps", "reliability")}
    overall, per_class, calib = [], [], []
    for c in scored_classes(card):
        sub = preds[preds[f"true_{c}"].notna() & preds[f"p_{c}"].notna()]  # known label, decoded case
        y, p = sub[f"true_{c}"].to_numpy(float), sub[f"p_{c}"].to_numpy(float)
        keys = sub["patient_key"].to_numpy()
        overall.append(_overall_row(c, y, p, keys, thr[c], n_boot=n_boot, ci=ci, seed=seed))
        per_class.append(_per_class_row(c, y, p, thr[c]))
        calib.append(_calibration_row(c, y, p, sub[f"p_raw_{c}"].to_numpy(float), card))
        parts["reliability"].append(_reliability(c, y, p, sub[f"p_raw_{c}"].to_numpy(float)))
        if attributes and len(sub):
            by_group, gaps = _subgroups(sub, c, thr[c], attributes, intersections, n_boot=n_boot, ci=ci,
                                        min_group_size=min_group_size, seed=seed)
            parts["by_group"].append(by_group)
            parts["gaps"].append(gaps)
    overall_df = pd.DataFrame(overall)
    if card.task != "binary" and len(overall_df):
        overall_df = pd.concat([overall_df, _macro_row(overall_df, preds)], ignore_index=True)
    # Empty tables keep their columns, so that ``result.gaps[result.gaps.flagged]`` works on data without subgroups.
    empty = {"by_group": ["class", *TABLE_COLUMNS], "gaps": ["class", *GAP_COLUMNS], "reliability": []}
    return {"overall": overall_df, "per_class": pd.DataFrame(per_class), "calibration": pd.DataFrame(calib),
            **{k: pd.concat(v, ignore_index=True) if v else pd.DataFrame(columns=empty[k]) for k, v in parts.items()}}


def _overall_row(c: str, y: np.ndarray, p: np.ndarray, keys: np.ndarray, thr: float, *, n_boot: int, ci: float,
                 seed: int) -> dict[str, Any]:
    point = binary_metrics(y, p, thr) if len(y) else {}
    row: dict[str, Any] = {"class": c, "n": int(len(y)), "n_patients": int(len(set(keys))),
                           "n_pos": int(np.sum(y == 1)), "prevalence": float(np.mean(y)) if len(y) else np.nan,
                           "threshold": float(thr)}
    boot = (metric_intervals(y, p, thr, clusters=keys, n_boot=n_boot, ci=ci, seed=seed, metrics=BINARY_METRICS)
            if n_boot > 0 and len(y) else {})
    for m in BINARY_METRICS:
        value, lo, hi, method = boot.get(m, (point.get(m, np.nan), np.nan, np.nan, "none"))
        row.update({m: float(value), f"{m}_lo": float(lo), f"{m}_hi": float(hi), f"{m}_ci_method": method})
    return row


def _per_class_row(c: str, y: np.ndarray, p: np.ndarray, thr: float) -> dict[str, Any]:
    point = binary_metrics(y, p, thr) if len(y) else {"n": 0}
    return {"class": c, "threshold": float(thr),
            **{k: (int(v) if k in ("n", "n_pos", "tp", "fp", "tn", "fn") else float(v)) for k, v in point.items()}}


def _macro_row(overall: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """Unweighted mean over the class rows (NaN classes skipped); no CI (the classes share cases)."""
    row: dict[str, Any] = {"class": "macro", "n": int(overall["n"].max()),
                           "n_patients": int(preds["patient_key"].nunique()), "n_pos": int(overall["n_pos"].sum()),
                           "prevalence": np.nan, "threshold": np.nan}
    for m in BINARY_METRICS:
        vals = overall[m].to_numpy(float)
        row.update({m: float(np.nanmean(vals)) if np.isfinite(vals).any() else np.nan,
                    f"{m}_lo": np.nan, f"{m}_hi": np.nan, f"{m}_ci_method": "none"})
    return pd.DataFrame([row])


def _calibration_row(c: str, y: np.ndarray, p: np.ndarray, p_raw: np.ndarray, card: ModelCard) -> dict[str, Any]:
    row: dict[str, Any] = {"class": c, "n": int(len(y)),
                           "temperature": float(card.temperature) if card.temperature else np.nan}
    for suffix, q in (("", p), ("_uncalibrated", p_raw)):
        has = len(y) > 0
        row[f"ece{suffix}"] = float(ece(y, q)) if has else np.nan
        row[f"ece_adaptive{suffix}"] = float(ece(y, q, adaptive=True)) if has else np.nan
        row[f"brier{suffix}"] = float(brier(y, q)) if has else np.nan
    return row


def _reliability(c: str, y: np.ndarray, p: np.ndarray, p_raw: np.ndarray) -> pd.DataFrame:
    if not len(y):
        return pd.DataFrame()
    frames = []
    for stage, q in (("uncalibrated", p_raw), ("calibrated", p)):
        curve = pd.DataFrame(reliability_curve(y, q)).reset_index(drop=True)
        curve.insert(0, "stage", stage)
        curve.insert(0, "class", c)
        frames.append(curve)
    return pd.concat(frames, ignore_index=True)


def _subgroups(sub: pd.DataFrame, c: str, thr: float, attributes: Sequence[str],
               intersections: Sequence[tuple[str, ...]], **kw: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    cols = {"y_col": f"true_{c}", "p_col": f"p_{c}", "threshold": thr, "attributes": list(attributes),
            "cluster_col": "patient_key"}
    table = pd.DataFrame(subgroup_table(sub, **cols, intersections=list(intersections), **kw))
    gaps = pd.DataFrame(subgroup_gaps(sub, **cols, **kw))
    table.insert(0, "class", c)
    gaps.insert(0, "class", c)
    return table, gaps


# -- operating points and meta --------------------------------------------------------------------------
def _threshold_table(run: Run, source: str) -> pd.DataFrame:
    ev = run.config.eval
    thr = thresholds_of(run.card)
    return pd.DataFrame([{"class": c, "threshold": v, "method": ev.threshold,
                          "target": float(ev.target) if ev.target is not None else np.nan, "source": source}
                         for c, v in thr.items()])


def _meta(run: Run, preds: pd.DataFrame, manifest: Manifest, name: str, *, split: str, notes: list[str],
          settings: dict[str, Any]) -> dict[str, Any]:
    """The result's ``meta``: what was evaluated, how, and a summary of the model (no paths, no PHI)."""
    card = run.card
    failed = int((preds["error"] != "").sum())
    if failed:
        notes = [*notes, f"{failed} case(s) could not be decoded and were left out (see predictions.csv)."]
    scored = preds[preds["error"] == ""]
    prevalence = {c: float(scored[f"true_{c}"].mean()) for c in scored_classes(card)}
    counts = card.training.get("counts", {}).get("train", {})
    total = sum(counts.values()) if counts and card.task != "multilabel" else 0  # multilabel: no case count
    train_prev = {c: counts.get(c, 0) / total for c in scored_classes(card)} if total else {}
    return {
        "split": split, "data": name, "run_id": run.path.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "medtransfer_version": __version__, "task": card.task, "classes": list(card.classes),
        "n_cases": int(len(preds) - failed), "n_failed": failed,
        "n_patients": int(preds.loc[preds["error"] == "", "patient_key"].nunique()),
        "prevalence": prevalence, "training_prevalence": train_prev,
        "warnings": [*manifest.warnings, *notes] if split == "external" else list(notes),
        "model": _card_summary(card), **settings,
    }


def _card_summary(card: ModelCard) -> dict[str, Any]:
    """The card fields a reader of the result needs (no weights path, no data summary)."""
    t = card.training
    return {"name": card.name, "backbone": card.backbone, "strategy": card.strategy, "task": card.task,
            "classes": list(card.classes), "input_size": list(card.input.size), "channels": card.input.channels,
            "temperature": card.temperature, "calibration": dict(card.calibration),
            "thresholds": dict(card.thresholds), "created": card.created,
            "best_epoch": t.get("best_epoch"), "best_val_auroc": t.get("best_val_auroc")}
