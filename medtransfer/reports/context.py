"""The template context: every number the report shows, read from a run directory (no torch).

:func:`load_run_files` reads what a run directory holds (each piece optional: a missing file becomes
``None`` and the report says "not provided"); :func:`build_context` turns it into plain dicts and strings
for the Jinja2 template, section by section. Values are formatted here so the template has no logic
beyond loops and ``if``; nothing is ever invented: absent data is :data:`NOT_PROVIDED`.

Privacy: only the data folder's *name* is shown, config values that are absolute paths are reduced to their
last component, and cases appear by pseudonymous ``case_id`` only (DESIGN.md §4).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from medtransfer.commands import run_ref
from medtransfer.config import ReportConfig
from medtransfer.data.manifest import SPLITS, Manifest
from medtransfer.format import NOT_PROVIDED, is_num, num, pct, plain_config, with_ci
from medtransfer.reports import checklist, figures, guidelines
from medtransfer.reports.files import RunFiles

if TYPE_CHECKING:
    from medtransfer.evaluation.result import EvaluationResult

logger = logging.getLogger(__name__)

DEMOGRAPHICS = ("sex", "age_band", "site", "manufacturer", "view", "modality")


# -- the context ------------------------------------------------------------------------------------------
def build_context(files: RunFiles) -> dict[str, Any]:
    """The whole template context (see the module docstring)."""
    report = _report_config(files.config)
    result = files.result
    ctx: dict[str, Any] = {
        "title": report.title if report.title not in DEFAULT_NAMES else None, "banner": report.banner, "contact": report.contact or NOT_PROVIDED,
        "intended_use": report.intended_use or NOT_PROVIDED, "not_provided": NOT_PROVIDED,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "evaluated": result is not None, "run_id": files.run_dir.name,
    }
    ctx["model"] = model_section(files)
    if ctx["title"] is None:  # no title chosen: name the report after the model, not after the tool
        ctx["title"] = f"Model report: {ctx['model']['name']}" if ctx["model"].get("present") else \
            f"Model report: run {files.run_dir.name}"
    ctx["data"] = data_section(files)
    ctx["training"] = training_section(files)
    ctx["performance"] = performance_section(result) if result is not None else None
    ctx["subgroups"] = subgroup_section(result) if result is not None else None
    ctx["explain"] = figures.gallery(files.run_dir / "saliency", files.saliency, files.sanity)
    ctx["evaluation"] = evaluation_summary(result)
    ctx["external"] = external_section(files)
    ctx["biggest_gap"] = biggest_gap(result)
    ctx["audit"] = audit_section(files.audit)
    ctx["sites"] = sites_section(files)
    ctx["site_profile"] = None  # set by render_report(site=...): the facts page then describes that profile
    ctx["commands"] = checklist.commands_for(files)
    ctx["checks"] = checklist.warnings(files, ctx)
    ctx["checks_open"] = [c for c in ctx["checks"] if c["status"] != "passed"]
    ctx["checks_passed"] = [c for c in ctx["checks"] if c["status"] == "passed"]
    ctx["limitations"] = checklist.limitations(files, ctx)
    ctx["repro"] = repro_section(files)
    ctx["guidelines"] = guidelines.guideline_items(ctx)
    return ctx


def _report_config(config: dict[str, Any]) -> ReportConfig:
    try:
        return ReportConfig.model_validate(config.get("report") or {})
    except ValueError as exc:
        logger.warning("config.yaml report: section not used (%s)", exc)
        return ReportConfig()


def model_section(files: RunFiles) -> dict[str, Any]:
    """Backbone, pretraining source, strategy, task sentence, input spec and training summary."""
    card = files.card
    if card is None:
        return {"present": False}
    w, t, d, spec = card.weights, card.training, card.data, card.input
    source = w.get("source") or w.get("weights") or NOT_PROVIDED
    modalities = ", ".join(d.get("modalities") or []) or "scan"
    size = "×".join(str(s) for s in spec.size)
    window = (f"DICOM window/VOI LUT when present, else {spec.percentiles[0]}–{spec.percentiles[1]} percentile "
              "clipping" if spec.window == "file" else f"{spec.window} intensity scaling")
    windows = getattr(spec, "windows", ())
    if windows:
        window = f"CT window{'s' if len(windows) > 1 else ''} {', '.join(windows)} (one channel each)"
    return {
        "present": True, "name": model_name(card, files.run_dir.name), "created": card.created[:10],
        "backbone": card.backbone,
        "pretraining": source, "pretrained_file": w.get("file") or NOT_PROVIDED,
        "pretrained_sha256": w.get("sha256") or NOT_PROVIDED, "strategy": card.strategy, "task": card.task,
        "task_sentence": task_sentence(card.task, card.classes, modalities), "classes": card.classes,
        "input": (volume_input(card, modalities, window) if len(spec.size) == 3 else
                  f"{modalities}; {spec.channels} channel(s) resized to {size} px"
                  f"{' (aspect kept by padding)' if spec.keep_aspect else ''}; {window}; "
                  f"normalised with mean {list(spec.mean)}, std {list(spec.std)}"),
        "volume_model": VOLUME_MODELS.get(card.volume or "", "") if card.volume else "",
        "temperature_short": f"T = {num(card.temperature, 2)}" if card.temperature else "not applied",
        "temperature": (f"T = {num(card.temperature, 2)}" if card.temperature else "not applied") + (
            f" ({card.calibration['reason']})" if card.calibration.get("reason") else ""),
        "thresholds": {c: num(v, 3) for c, v in card.thresholds.items()},
        "epochs_run": t.get("epochs_run", NOT_PROVIDED), "best_epoch": t.get("best_epoch", NOT_PROVIDED),
        "best_val_auroc": num(t.get("best_val_auroc")), "seconds": num(t.get("seconds"), 1),
        "device": (t.get("device") or {}).get("device", NOT_PROVIDED), "seed": t.get("seed", NOT_PROVIDED),
        "stopped_early": t.get("stopped_early"),
        "population": _population(d), "version": files.weights_sha256[:12] if files.weights_sha256 else NOT_PROVIDED,
        "versions": card.versions,
    }


#: What each ``model.volume`` kind does, in one line for the report.
VOLUME_MODELS = {
    "slices": "2.5D: the ImageNet backbone encodes every axial slice; attention-MIL pooling (Ilse et al. 2018) "
              "weighs the slices (the weights are saved with each prediction)",
    "acs": "ACS convolutions (Yang et al. 2021): the ImageNet 2D kernels applied in axial, coronal and sagittal "
           "planes of the volume",
    "native": "a 3D network trained from random weights (no transfer)",
}


def volume_input(card: Any, modalities: str, window: str) -> str:
    """The model-facts input line of a volume model: orientation, spacing, intensity, size, model kind."""
    spec = card.input
    spacing = getattr(spec, "spacing", None)
    resample = (f"resampled to {'×'.join(f'{v:g}' for v in spacing)} mm (D×H×W)" if spacing
                else "voxel spacing as stored (not resampled)")
    size = "×".join(str(s) for s in spec.size)
    context = (f"; slices fed {'as 3 adjacent slices (RGB)' if card.slice_context == 3 else 'one at a time'}"
               if card.volume == "slices" else "")
    return (f"{modalities} volumes; reoriented to {getattr(spec, 'orientation', 'RAS')}, {resample}; {window}; "
            f"resized to {size} voxels (D×H×W, slices inferior to superior); normalised with mean "
            f"{list(spec.mean)}, std {list(spec.std)}; model: {card.volume}{context}")


def task_sentence(task: str, classes: list[str], modality: str) -> str:
    """One plain sentence describing what the model outputs."""
    if task == "binary":
        return (f"Estimates the probability that a {modality} image shows {classes[1]} (rather than {classes[0]}),"
                " and flags it when that probability reaches the stored threshold.")
    if task == "multiclass":
        return f"Assigns a {modality} image to one of {len(classes)} classes: {', '.join(classes)}."
    return f"Estimates, for each of {', '.join(classes)}, the probability that it is present in a {modality} image."


#: Card names that are defaults, not a name a user gave (the model is then named by backbone and run).
DEFAULT_NAMES = frozenset({"medtransfer model", "medtransfer model report", ""})


def model_name(card: Any, run_id: str) -> str:
    """The model's name: the one the user gave (config ``report.title``), else backbone, classes and run."""
    if card.name not in DEFAULT_NAMES:
        return card.name
    return f"{card.backbone} {' vs '.join(card.classes) if card.task == 'binary' else card.task} classifier (run {run_id})"


def _values(d: dict[str, Any], key: str) -> list[str]:
    return [str(v) for v in d.get(key) or [] if str(v).strip()]


def _population(d: dict[str, Any]) -> dict[str, str]:
    """The training population, field by field, and as one sentence that names only what was recorded."""
    ages = d.get("age_range") or []
    mods, views, sexes, sites = (_values(d, k) for k in ("modalities", "views", "sexes", "sites"))
    fields = {
        "modalities": ", ".join(mods) or NOT_PROVIDED,
        "views": ", ".join(views) or NOT_PROVIDED,
        "sites": (f"{len(sites)} ({', '.join(sites)})" if sites else NOT_PROVIDED),
        "sexes": ", ".join(sexes) or NOT_PROVIDED,
        "ages": f"{ages[0]:g}–{ages[1]:g} years" if len(ages) == 2 and all(map(is_num, ages)) else NOT_PROVIDED,
    }
    known = [f"{fields['modalities']} scans" if mods else "", f"views {fields['views']}" if views else "",
             f"ages {fields['ages']}" if fields["ages"] != NOT_PROVIDED else "", f"sex {fields['sexes']}" if sexes else "",
             f"{len(sites)} site{'s' if len(sites) != 1 else ''} ({', '.join(sites)})" if sites else ""]
    absent = [name for name, value in (("modality", mods), ("view", views), ("age", fields["ages"] != NOT_PROVIDED),
                                       ("sex", sexes), ("site", sites)) if not value]
    sentence = "; ".join(k for k in known if k)
    if absent:
        sentence += ("; " if sentence else "") + f"not recorded: {', '.join(absent)}"
    return {**fields, "sentence": sentence}


def data_section(files: RunFiles) -> dict[str, Any]:
    """Counts per split, demographics per split, the leakage proof and quarantine counts (no paths)."""
    m = files.manifest
    if m is None:
        return {"present": False}
    df = m.df
    splits = [s for s in SPLITS if "split" in df.columns and (df["split"] == s).any()]
    parts = {s: df[df["split"] == s] for s in splits}
    rows = [("patients", [int(p["patient_key"].nunique()) for p in parts.values()]),
            ("studies", [int(p["study_key"].nunique()) if "study_key" in p else NOT_PROVIDED for p in parts.values()]),
            ("images", [_images(p) for p in parts.values()]), ("cases", [len(p) for p in parts.values()])]
    for cls in m.classes:
        name = f"positives: {cls}" if m.task == "multilabel" else f"labelled {cls}"
        rows.append((name, [_positives(p, m, cls) for p in parts.values()]))
    per_patient = df.groupby("patient_key")["split"].nunique() if "split" in df.columns else pd.Series(dtype=int)
    q = m.quarantine
    return {
        "present": True, "folder": Path(str(m.data_dir)).name or NOT_PROVIDED, "task": m.task,
        "classes": m.classes, "splits": splits, "counts": rows,
        "demographics": _demographics(parts), "ages": _age_summary(parts),
        "leaked_patients": int((per_patient > 1).sum()), "n_patients": int(df["patient_key"].nunique()),
        "quarantine": {str(k): int(v) for k, v in q["problem"].value_counts().items()} if len(q) else {},
        "quarantine_total": len(q), "warnings": list(m.warnings),
        "modalities": sorted(df["modality"].dropna().astype(str).unique()) if "modality" in df else [],
        "geometry": source_geometry(df),
    }


def source_geometry(df: pd.DataFrame) -> str | None:
    """For volumes, the source size and in-plane spacing as stored (median and range over cases), else None.

    Read from the manifest's header columns (``rows``, ``cols``, ``frames`` = slices, ``spacing_row``/``_col``).
    """
    if not {"rows", "cols", "frames"} <= set(df.columns):
        return None
    frames = pd.to_numeric(df["frames"], errors="coerce")
    vol = df[frames > 1]
    if vol.empty:
        return None

    def span(col: str, unit: str = "") -> str:
        v = pd.to_numeric(vol[col], errors="coerce").dropna() if col in vol else pd.Series(dtype=float)
        if v.empty:
            return NOT_PROVIDED
        lo, med, hi = v.min(), v.median(), v.max()
        return f"{med:g}{unit}" if lo == hi else f"{med:g}{unit} ({lo:g}–{hi:g})"

    return (f"{len(vol)} volumes as stored: {span('frames')} slices of {span('rows')} × {span('cols')} pixels "
            f"(median, range); in-plane spacing {span('spacing_row', ' mm')} × {span('spacing_col', ' mm')}")


def _images(part: pd.DataFrame) -> int:
    if "files" not in part.columns:
        return len(part)
    return int(sum(len([f for f in str(v).split(";") if f]) or 1 for v in part["files"].fillna("")))


def _positives(part: pd.DataFrame, m: Manifest, cls: str) -> int:
    if m.task == "multilabel":
        return int(pd.to_numeric(part[cls], errors="coerce").eq(1).sum())
    return int((part["label"].astype(str) == cls).sum())


def _demographics(parts: dict[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Rows ``{attribute, value, cells: [(count, pct) per split]}``; blank values count as ``unknown``."""
    rows = []
    for col in DEMOGRAPHICS:
        if not any(col in p.columns for p in parts.values()):
            continue
        values = sorted({_cat(v) for p in parts.values() for v in p.get(col, pd.Series(dtype=object))})
        for i, value in enumerate(values):
            cells = []
            for p in parts.values():
                n = int(sum(_cat(v) == value for v in p.get(col, pd.Series(dtype=object))))
                cells.append(f"{n} ({100 * n / len(p):.0f}%)" if len(p) else "0")
            rows.append({"attribute": col if i == 0 else "", "value": value, "cells": cells, "first": i == 0})
    return rows


def _cat(v: Any) -> str:
    return "unknown" if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == "" else str(v)


def _age_summary(parts: dict[str, pd.DataFrame]) -> list[str]:
    out = []
    for p in parts.values():
        ages = pd.to_numeric(p.get("age", pd.Series(dtype=float)), errors="coerce").dropna()
        out.append(f"{ages.median():.0f} ({ages.min():.0f}–{ages.max():.0f})" if len(ages) else NOT_PROVIDED)
    return out


def training_section(files: RunFiles) -> dict[str, Any]:
    """The training curves figure and the per-epoch table."""
    hist = files.history
    best = files.card.training.get("best_epoch") if files.card else None
    fig = figures.history_figure(hist, best) if hist is not None else None
    rows = []
    if hist is not None:
        for r in hist.to_dict("records"):
            rows.append({"epoch": r.get("epoch"), "phase": r.get("phase", ""), "lr": f"{r.get('lr', float('nan')):.2e}",
                         "train_loss": num(r.get("train_loss"), 4), "val_loss": num(r.get("val_loss"), 4),
                         "val_auroc": num(r.get("val_auroc")), "best": r.get("epoch") == best})
    return {"figure": fig, "rows": rows}


def evaluation_summary(result: EvaluationResult | None) -> dict[str, Any] | None:
    """Which data the metrics come from, how many cases and patients, prevalence, bootstrap settings."""
    if result is None:
        return None
    m = result.meta
    split = m.get("split", NOT_PROVIDED)
    where = ("external data set" if split == "external" else f"internal '{split}' split")
    return {
        "where": f"{where} of '{m.get('data', NOT_PROVIDED)}'", "split": split, "external": split == "external",
        "n_cases": m.get("n_cases", NOT_PROVIDED), "n_patients": m.get("n_patients", NOT_PROVIDED),
        "n_failed": m.get("n_failed", 0), "n_boot": m.get("n_boot", NOT_PROVIDED),
        "ci": f"{100 * m['ci']:.0f}%" if is_num(m.get("ci")) else "95%",
        "prevalence": {c: pct(v) for c, v in (m.get("prevalence") or {}).items()},
        "training_prevalence": {c: pct(v) for c, v in (m.get("training_prevalence") or {}).items()},
        "min_group_size": m.get("min_group_size", NOT_PROVIDED), "warnings": list(m.get("warnings") or []),
        "ci_text": ci_text(result),
        "date": str(m.get("created", NOT_PROVIDED))[:10],
    }


def external_section(files: RunFiles) -> list[dict[str, Any]]:
    """One entry per external evaluation saved under the run (``external/<name>/``), with its headline metrics."""
    out = []
    for name, r in files.external.items():
        rows = [{"class": x["class"], "auroc": with_ci(x.get("auroc"), x.get("auroc_lo"), x.get("auroc_hi")),
                 "sensitivity": with_ci(x.get("sensitivity"), x.get("sensitivity_lo"), x.get("sensitivity_hi")),
                 "specificity": with_ci(x.get("specificity"), x.get("specificity_lo"), x.get("specificity_hi"))}
                for x in r.overall.to_dict("records") if x.get("class") != "macro"]
        own = files.run_dir / "external" / name / "report.html"
        out.append({"name": name, "date": str(r.meta.get("created", NOT_PROVIDED))[:10], "rows": rows,
                    "n_cases": r.meta.get("n_cases", NOT_PROVIDED), "n_patients": r.meta.get("n_patients", NOT_PROVIDED),
                    "report": f"external/{name}/report.html" if own.is_file() else
                              f"not rendered: run 'medtransfer report {run_ref(files.run_dir)}/external/{name}'"})
    return out


CI_METHOD_WORDS = {
    "wilson-cluster": "Wilson score intervals adjusted for patients with several images",
    "bootstrap": "patient-level bootstrap",
    "hanley-mcneil": "Hanley–McNeil (the bootstrap was degenerate)",
    "wilson-auc-fallback": "a Wilson bound (perfect or null separation: the bootstrap had no spread)",
    "wilson-auprc-fallback": "a Wilson bound (the bootstrap had no spread)",
}


def ci_text(result: EvaluationResult) -> str:
    """How the intervals were made, per metric, in one sentence (from the ``<metric>_ci_method`` columns)."""
    m, overall = result.meta, result.overall
    level = f"{100 * m['ci']:.0f}%" if is_num(m.get("ci")) else "95%"
    if not is_num(m.get("n_boot")) or not m.get("n_boot"):
        return f"No confidence intervals (n_boot = {m.get('n_boot', 0)})."
    rows = overall[overall["class"] != "macro"] if "class" in overall else overall
    parts = []
    for metric, label in (("sensitivity", "sensitivity, specificity, PPV and NPV"), ("auroc", "AUROC")):
        methods = sorted({str(v) for v in rows.get(f"{metric}_ci_method", pd.Series(dtype=object)).dropna()} - {"none"})
        if methods:
            parts.append(f"{label}: {' / '.join(CI_METHOD_WORDS.get(x, x) for x in methods)}")
    how = "; ".join(parts) if parts else "patient-level bootstrap"
    return f"{level} CIs ({how}; {m['n_boot']} resamples where bootstrapped)."


def repro_section(files: RunFiles) -> dict[str, Any]:
    """Config (paths reduced to names), its hash, versions, seeds, manifest digest, weights hashes."""
    cfg = plain_config(files.config)
    card, meta = files.card, (files.result.meta if files.result is not None else {})
    seeds = {"data split seed": (files.config.get("data") or {}).get("seed", NOT_PROVIDED),
             "training seed": (files.config.get("train") or {}).get("seed", NOT_PROVIDED),
             "bootstrap seed": meta.get("seed", NOT_PROVIDED)}
    return {
        "config_yaml": yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True) if cfg else NOT_PROVIDED,
        "config_sha256": files.config_sha256 or NOT_PROVIDED, "seeds": seeds,
        "versions": dict(card.versions) if card else {},
        "manifest_digest": (card.data.get("manifest_digest") if card else None) or NOT_PROVIDED,
        "weights_sha256": files.weights_sha256 or NOT_PROVIDED,
        "pretrained_sha256": (card.weights.get("sha256") if card else None) or NOT_PROVIDED,
        "n_boot": meta.get("n_boot", NOT_PROVIDED), "run_id": files.run_dir.name,
    }


# -- performance and subgroups ---------------------------------------------------------------------------
PERF_METRICS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("sensitivity", "Sensitivity"),
                ("specificity", "Specificity"), ("ppv", "PPV"), ("npv", "NPV"), ("f1", "F1"),
                ("accuracy", "Accuracy"))


def performance_section(result: EvaluationResult) -> dict[str, Any]:
    """Per-class metrics with CIs, confusion counts, ROC/PR and reliability figures, calibration table."""
    per_class = {r["class"]: r for r in result.per_class.to_dict("records")}
    calib = {r["class"]: r for r in result.calibration.to_dict("records")}
    classes = []
    for r in result.overall.to_dict("records"):
        cls, pc, cal = r["class"], per_class.get(r["class"], {}), calib.get(r["class"], {})
        entry = {"name": cls, "n": r.get("n"), "n_pos": r.get("n_pos"), "prevalence": pct(r.get("prevalence")),
                 "threshold": num(r.get("threshold")),
                 "metrics": [(label, with_ci(r.get(k), r.get(f"{k}_lo"), r.get(f"{k}_hi"))) for k, label in PERF_METRICS],
                 "confusion": {k: int(pc[k]) if is_num(pc.get(k)) else NOT_PROVIDED for k in ("tp", "fp", "tn", "fn")},
                 "calibration": _calibration_row(cal), "figures": []}
        entry["metric_map"] = dict(entry["metrics"])
        if cls != "macro":
            entry["figures"] = _class_figures(result, cls, pc, cal)
        classes.append(entry)
    return {"classes": classes, "multiclass_confusion": _multiclass_confusion(result),
            "thresholds": [{"class": t.get("class"), "threshold": num(t.get("threshold")), "method": t.get("method"),
                            "source": t.get("source") or NOT_PROVIDED} for t in result.thresholds.to_dict("records")]}


def _calibration_row(cal: dict[str, Any]) -> dict[str, str]:
    return {"temperature": num(cal.get("temperature")), "ece": num(cal.get("ece")),
            "ece_uncalibrated": num(cal.get("ece_uncalibrated")), "brier": num(cal.get("brier")),
            "brier_uncalibrated": num(cal.get("brier_uncalibrated"))}


def _class_figures(result: EvaluationResult, cls: str, pc: dict[str, Any], cal: dict[str, Any]) -> list:
    preds, out = result.predictions, []
    if f"true_{cls}" in preds.columns and f"p_{cls}" in preds.columns:
        ok = preds.get("error", pd.Series("", index=preds.index)).fillna("") == ""
        y = pd.to_numeric(preds.loc[ok, f"true_{cls}"], errors="coerce").to_numpy(dtype=float)
        p = pd.to_numeric(preds.loc[ok, f"p_{cls}"], errors="coerce").to_numpy(dtype=float)
        out.append(figures.roc_pr_figure(y, p, cls, sensitivity=pc.get("sensitivity"),
                                         specificity=pc.get("specificity"), ppv=pc.get("ppv"),
                                         threshold=pc.get("threshold")))
    rel = result.reliability
    if len(rel) and "class" in rel.columns:
        out.append(figures.reliability_figure(rel[rel["class"] == cls], cls, ece=cal.get("ece"),
                                              ece_uncalibrated=cal.get("ece_uncalibrated")))
    return [f for f in out if f is not None]


def _multiclass_confusion(result: EvaluationResult) -> dict[str, Any] | None:
    """K x K counts (rows: true label, columns: predicted) for multi-class tasks, from predictions.csv."""
    preds = result.predictions
    if result.meta.get("task") != "multiclass" or not {"label", "predicted"} <= set(preds.columns):
        return None
    classes = list(result.meta.get("classes") or [])
    table = pd.crosstab(preds["label"].astype(str), preds["predicted"].astype(str))
    table = table.reindex(index=classes, columns=classes, fill_value=0)
    return {"classes": classes, "rows": [(c, [int(v) for v in table.loc[c]]) for c in classes]}


def subgroup_section(result: EvaluationResult) -> dict[str, Any]:
    """Subgroup rows (flagged / insufficient marked), gap rows with CIs, one forest plot per class."""
    by_group, gaps = result.by_group, result.gaps
    flagged = gaps[gaps["flagged"].fillna(False).astype(bool)] if "flagged" in gaps.columns else gaps.iloc[0:0]
    worst = {(g["class"], g["attribute"], str(g["worst_group"])) for g in flagged.to_dict("records")}
    rows = []
    for r in by_group.to_dict("records"):
        ok = r.get("status") == "ok"
        ci = with_ci if ok else _not_assessed
        rows.append({"class": r.get("class"), "attribute": r["attribute"], "group": r["group"], "n": r["n"],
                     "n_patients": r.get("n_patients"), "n_pos": r.get("n_pos"), "prevalence": pct(r.get("prevalence")),
                     "auroc": ci(r.get("auroc"), r.get("auroc_lo"), r.get("auroc_hi")),
                     "sensitivity": ci(r.get("sensitivity"), r.get("sensitivity_lo"), r.get("sensitivity_hi")),
                     "specificity": ci(r.get("specificity"), r.get("specificity_lo"), r.get("specificity_hi")),
                     "ece": num(r.get("ece")) if ok else "–",
                     "status": str(r.get("status") or NOT_PROVIDED).replace("min_group_size", "minimum"), "ok": ok,
                     "flagged": (r.get("class"), r["attribute"], str(r["group"])) in worst})
    gap_rows = [{"class": g.get("class"), "attribute": g["attribute"], "metric": g["metric"],
                 "gap": with_ci(g.get("gap"), g.get("gap_lo"), g.get("gap_hi")) if is_num(g.get("gap")) else "not computed",
                 "worst": f"{g['worst_group']} ({num(g.get('worst_value'))})" if is_num(g.get("gap")) else "–",
                 "best": f"{g['best_group']} ({num(g.get('best_value'))})" if is_num(g.get("gap")) else "–",
                 "flagged": bool(g.get("flagged")), "reason": g.get("reason") if isinstance(g.get("reason"), str) else ""}
                for g in gaps.to_dict("records")]
    overall = {r["class"]: r for r in result.overall.to_dict("records")}
    figs = []
    if len(by_group) and "class" in by_group.columns:
        for cls, part in by_group.groupby("class", sort=False):
            o = overall.get(cls, {})
            figs.append(figures.forest_figure(part.reset_index(drop=True), str(cls),
                                              overall={"auroc": o.get("auroc"), "sensitivity": o.get("sensitivity")}))
    return {"rows": rows, "gaps": gap_rows, "figures": [f for f in figs if f is not None],
            "n_flagged": len(flagged), "any": bool(rows)}


def _not_assessed(*_: Any) -> str:
    return "not assessed"


METRIC_LABELS = {"auroc": "AUROC", "sensitivity": "sensitivity", "specificity": "specificity"}


def biggest_gap(result: EvaluationResult | None) -> dict[str, Any] | None:
    """The largest computed subgroup gap (flagged ones first), formatted; None when none was computed."""
    if result is None or result.gaps.empty or "gap" not in result.gaps.columns:
        return None
    gaps = result.gaps[pd.to_numeric(result.gaps["gap"], errors="coerce").notna()]
    if gaps.empty:
        return None
    g = gaps.assign(_f=gaps["flagged"].fillna(False).astype(bool)).sort_values(["_f", "gap"], ascending=False).iloc[0]
    return {"text": f"{METRIC_LABELS.get(g['metric'], g['metric'])} gap {with_ci(g['gap'], g['gap_lo'], g['gap_hi'])} by {g['attribute']}: "
                    f"{g['worst_group']} ({num(g['worst_value'])}) vs {g['best_group']} ({num(g['best_value'])})"
                    f"{' for ' + str(g['class']) if 'class' in g else ''}",
            "flagged": bool(g["_f"])}


def audit_section(audit: dict[str, Any] | None) -> dict[str, Any] | None:
    """"Does transfer help, and does it generalise?": learning curve, time-to-target, probe, LOSO tables."""
    if not audit:
        return None
    out: dict[str, Any] = {"transfer": None, "shortcuts": None}
    t = audit.get("transfer")
    if t and t.get("curve"):
        curve = pd.DataFrame(t["curve"])
        cells = pd.DataFrame(t.get("cells") or [])
        summ = t.get("summary") or {}
        eff = [{"strategy": s, "fraction": ("≤ " if d.get("reached_at_smallest") else "") + _pct(d.get("fraction_to_match")),
                "gain": ("≥ " if d.get("reached_at_smallest") else "") + _x(d.get("gain")),
                "reference": num(d.get("scratch_auroc_at_full"))} for s, d in (summ.get("data_efficiency") or {}).items()]
        speed = [{"strategy": s, "seconds": num(d.get("seconds_to_target"), 0), "scratch": num(d.get("scratch_seconds_to_target"), 0), "speedup": _x(d.get("speedup"))} for s, d in (summ.get("speedup") or {}).items()]
        rows = [{"strategy": r["strategy"], "fraction": _pct(r["fraction"]), "auroc": num(r["test_auroc"]),
                 "ci": with_ci(r["test_auroc"], r.get("test_lo"), r.get("test_hi")), "sd": num(r.get("sd")),
                 "seeds": r.get("seeds"), "seconds": num(r.get("seconds"), 0)} for r in curve.to_dict("records")]
        out["transfer"] = {"curve_figure": figures.learning_curve_figure(curve),
                           "ttt_figure": figures.time_to_target_figure(cells, summ.get("target_auroc")),
                           "rows": rows, "efficiency": eff, "speed": speed, "warnings": t.get("warnings") or [],
                           "target": num(summ.get("target_auroc")), "settings": summ.get("settings") or {}}
    sc = audit.get("shortcuts")
    if sc:
        probe = [{"attribute": r["attribute"], "n": r.get("n"), "bacc": num(r.get("balanced_accuracy")),
                  "chance": num(r.get("chance")), "flagged": bool(r.get("flagged")), "status": r.get("status")}
                 for r in sc.get("probe") or []]
        loso = [{"site": r["site"], "n": r.get("n_test"), "all": _ci(r, "auroc_all_sites", "all_lo", "all_hi"),
                 "out": _ci(r, "auroc_left_out", "out_lo", "out_hi"), "drop": _ci(r, "drop", "drop_lo", "drop_hi"),
                 "flagged": bool(r.get("flagged")), "status": r.get("status")} for r in sc.get("loso") or []]
        prev = [{"site": r["site"], "n": r.get("n"), "prevalence": num(r.get("prevalence")),
                 "mean_p": num(r.get("mean_probability")), "rate": num(r.get("predicted_positive_rate"))}
                for r in sc.get("prevalence") or []]
        sal = [{"method": r["method"], "site": r["site"], "maps": r.get("maps"), "border": num(r.get("border_mass")),
                "corner": num(r.get("corner_mass")), "hint_rate": _pct(r.get("hint_rate"))}
               for r in sc.get("saliency") or []]
        out["shortcuts"] = {"probe": probe, "loso": loso, "prevalence": prev, "saliency": sal,
                            "warnings": sc.get("warnings") or [], "notes": sc.get("notes") or []}
    return out


def _pct(v: Any) -> str:
    return "—" if v is None or v != v else f"{100 * float(v):.0f}%"


def _x(v: Any) -> str:
    return "—" if v is None or v != v else f"{float(v):.1f}×"


def _ci(r: dict[str, Any], k: str, lo: str, hi: str) -> str:
    if r.get(k) is None:
        return "—"
    return with_ci(r.get(k), r.get(lo), r.get(hi))


#: What a site profile cannot fix, said in every "Transfer to <site>" section.
SITE_LIMITS = ("A site profile recalibrates (temperature, operating point, prevalence) and re-normalises "
               "(BatchNorm statistics); it cannot teach the model what it does not see at the site. If the site's "
               "AUROC is clearly lower than at training, or a subgroup fails there, retrain with the site's data "
               "instead. 'No shift detected' means the scans look like the training data as the model sees them, "
               "not that the model works at the site: only labels show that.")

_OPTION_NAMES = {"adabn": "BatchNorm statistics re-estimated on the site's scans (AdaBN)",
                 "prevalence": "probabilities corrected to the site's estimated prevalence (EM)",
                 "temperature": "temperature refitted on the site's labelled cases",
                 "threshold": "operating point re-chosen on the site's labelled cases"}


def sites_section(files: RunFiles) -> list[dict[str, Any]]:
    """One entry per site profile under ``<run>/sites/`` for the "Transfer to <site>" sections."""
    out = []
    for name, site in files.sites.items():
        shift, profile, table = site.get("shift") or {}, site.get("profile") or {}, site.get("table")
        ci = shift.get("domain_auroc_ci") or [None, None]
        rows = []
        if table is not None and len(table):
            for r in table.to_dict("records"):
                rows.append({"option": r.get("option", ""), "chosen": bool(r.get("chosen")),
                             "auroc": _ci(r, "auroc", "auroc_lo", "auroc_hi"),
                             "sensitivity": _ci(r, "sensitivity", "sensitivity_lo", "sensitivity_hi"),
                             "specificity": _ci(r, "specificity", "specificity_lo", "specificity_hi"),
                             "ece": _ci(r, "ece", "ece_lo", "ece_hi"),
                             "n": "—" if r.get("n_holdout") != r.get("n_holdout") or r.get("n_holdout") is None
                             else str(int(r["n_holdout"]))})
        out.append({
            "name": name, "verdict": shift.get("verdict", "no shift check recorded"),
            "shift": shift.get("shift"), "p_value": _p(shift.get("p_value")),
            "mmd_p": _p(shift.get("mmd_p_value")),
            "domain_auroc": (f"{shift['domain_auroc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
                             if shift.get("domain_auroc") is not None and None not in ci else "-"),
            "n": shift.get("method", {}).get("n_site"), "n_reference": shift.get("method", {}).get("n_reference"),
            "unlike": list(shift.get("unlike") or [])[:10],
            "options": [_OPTION_NAMES.get(o, o) for o in profile.get("options") or []],
            "notes": list(profile.get("notes") or []), "rows": rows, "created": profile.get("created", ""),
            "limits": SITE_LIMITS, "figure": figures.shift_figure(shift),
        })
    return out


def site_profile_facts(files: RunFiles, name: str) -> dict[str, Any]:
    """What the Model Facts page says when the report describes site profile ``name``."""
    site = files.sites.get(name)
    if site is None:
        from medtransfer.errors import RunDirError

        raise RunDirError(f"no site profile '{name}' in {files.run_dir / 'sites'} (profiles: "
                          f"{', '.join(files.sites) or 'none'}); make one with 'medtransfer adapt'")
    profile = site["profile"]
    return {"name": name, "options": [_OPTION_NAMES.get(o, o) for o in profile.get("options") or []],
            "thresholds": profile.get("thresholds"), "temperature": profile.get("temperature"),
            "verdict": (site.get("shift") or {}).get("verdict", "")}


def _p(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2g}"
