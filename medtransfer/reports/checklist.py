"""Automatic checks (the page-1 traffic lights), limitations, and the reporting-guideline appendix.

- :func:`warnings`: one entry per check (evaluation present, test-set size, subgroup gaps, calibration,
  saliency sanity, shortcut hints, patient leakage, quarantine), each ``red``/``amber``/``green``/``grey``
  (not assessed) with what the finding means for a patient and what to do about it.
- :func:`limitations`: limitations the run itself reveals (single site, small subgroups, prevalence shift,
  no external validation, synthetic or unknown demographics, populations absent from training).
- :func:`checklist_items`: CLAIM 2024 and TRIPOD+AI items the report fills (and where), and those only the
  authors can provide. Topics are paraphrased; TRIPOD+AI numbers follow Collins et al., BMJ 2024. Authors
  should check the wording and numbering against the official checklists before submission.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from medtransfer.reports.files import RunFiles
from medtransfer.reports.format import NOT_PROVIDED, is_num, num, pct, with_ci

SMALL_TEST_CASES = 100
SMALL_TEST_POSITIVES = 20
ECE_LIMIT = 0.1
PREVALENCE_SHIFT = 0.10
LEVEL_ORDER = {"red": 0, "amber": 1, "grey": 2, "green": 3}


def _check(level: str, title: str, detail: str, meaning: str = "", action: str = "") -> dict[str, str]:
    return {"level": level, "title": title, "detail": detail, "meaning": meaning, "action": action}


def warnings(files: RunFiles, ctx: dict[str, Any]) -> list[dict[str, str]]:
    """Every check with its light, worst first (see the module docstring)."""
    checks = [*_evaluation_checks(files), _leakage_check(ctx["data"]), _quarantine_check(ctx["data"]),
              *_saliency_checks(ctx["explain"], files.run_dir.name), *_audit_checks(ctx.get("audit"))]
    return sorted(checks, key=lambda c: LEVEL_ORDER[c["level"]])


def _audit_checks(audit: dict[str, Any] | None) -> list[dict[str, str]]:
    """Negative transfer, a model that can see the site, a leave-one-site-out drop (only when audited)."""
    if not audit:
        return []
    out = []
    t = audit.get("transfer")
    if t:
        negative = [w for w in t["warnings"] if w.startswith("Negative transfer")]
        out.append(_check("amber", "Negative transfer", negative[0],
                          "ImageNet pretraining buys nothing here; a simpler model may be as good.",
                          "See 'Does transfer help'; check the preprocessing or prefer the scratch model.")
                   if negative else _check("green", "Pretraining helps", "The best pretrained strategy beats "
                                           "training from scratch with all the data (transfer audit)."))
    s = audit.get("shortcuts")
    if s:
        seen = [r for r in s["probe"] if r["flagged"]]
        drops = [r for r in s["loso"] if r["flagged"]]
        if seen or drops:
            detail = "; ".join([f"features predict {r['attribute']} (balanced accuracy {r['bacc']})" for r in seen]
                               + [f"AUROC at {r['site']} drops when it is left out of training: {r['drop']}"
                                  for r in drops])
            out.append(_check("amber", "Hospital signal", detail + ".",
                              "The model can tell hospitals apart and may not perform the same at a new one.",
                              "Validate on an external site before use; see 'Is the model learning the hospital?'."))
        else:
            out.append(_check("green", "No hospital signal found", "Site probe and leave-one-site-out checks "
                              "did not flag anything."))
    return out


def _evaluation_checks(files: RunFiles) -> list[dict[str, str]]:
    r = files.result
    if r is None:
        return [_check("red", "Not evaluated", "No evaluation.json in this run.",
                       "Nothing is known about how often this model is right or wrong for patients.",
                       f"Run 'medtransfer evaluate {files.run_dir.name}' and render this report again.")]
    out = [_size_check(r), _gap_check(r), _calibration_check(r)]
    notes = list(r.meta.get("warnings") or [])
    if notes:
        out.append(_check("amber", "Evaluation notes", " ".join(notes),
                          "Some cases or subgroups were left out of the numbers above.",
                          "Read the notes and decide whether the excluded cases matter for your patients."))
    return out


def _size_check(r: Any) -> dict[str, str]:
    rows = r.overall[r.overall["class"] != "macro"] if "class" in r.overall else r.overall
    n = int(r.meta.get("n_cases") or (rows["n"].max() if len(rows) else 0))
    pos = {str(x["class"]): int(x["n_pos"]) for x in rows.to_dict("records") if is_num(x.get("n_pos"))}
    fewest = min(pos.values()) if pos else 0
    detail = f"{n} test cases; positives: " + ", ".join(f"{c} {k}" for c, k in pos.items())
    if n >= SMALL_TEST_CASES and fewest >= SMALL_TEST_POSITIVES:
        return _check("green", "Test set size", detail)
    sens = rows.iloc[int(rows["n_pos"].astype(float).argmin())] if len(rows) else {}
    span = (f" the sensitivity for {sens['class']} could be anywhere from {num(sens.get('sensitivity_lo'), 2)} to "
            f"{num(sens.get('sensitivity_hi'), 2)}" if len(rows) else "")
    return _check("amber", "Small test set", f"{detail} (fewer than {SMALL_TEST_CASES} cases or "
                  f"{SMALL_TEST_POSITIVES} positives).",
                  f"The intervals are wide: for patients,{span}.",
                  f"Evaluate on at least {SMALL_TEST_CASES} cases with {SMALL_TEST_POSITIVES}+ positives per class, "
                  "preferably from another site, before relying on these numbers.")


def _gap_check(r: Any) -> dict[str, str]:
    gaps = r.gaps
    if gaps.empty or "gap" not in gaps.columns or pd.to_numeric(gaps["gap"], errors="coerce").isna().all():
        return _check("grey", "Subgroup gaps not assessed",
                      "No subgroup had enough patients for a comparison (see Subgroups).",
                      "Whether some patients (by sex, age, site) get worse results is unknown.",
                      "Evaluate on more data per subgroup (medtransfer evaluate --min-group-size sets the floor).")
    flagged = gaps[gaps["flagged"].fillna(False).astype(bool)]
    if flagged.empty:
        return _check("green", "No subgroup gap flagged", f"{int(gaps['gap'].notna().sum())} gap(s) computed; "
                      "every confidence interval includes zero.")
    g = flagged.sort_values("gap", ascending=False).iloc[0]
    text = "; ".join(f"{x['attribute']} {x['metric'].upper()} gap {with_ci(x['gap'], x['gap_lo'], x['gap_hi'])} "
                     f"(worst: {x['worst_group']})" for x in flagged.to_dict("records"))
    return _check("red", "Subgroup gap flagged", text,
                  f"Patients in group {g['attribute']}={g['worst_group']} get measurably worse results than "
                  f"{g['best_group']} ({g['metric'].upper()} {num(g['worst_value'])} vs {num(g['best_value'])}).",
                  f"Do not rely on the model for {g['attribute']}={g['worst_group']} patients until more of their "
                  "data are collected and the gap is re-evaluated.")


def _calibration_check(r: Any) -> dict[str, str]:
    cal = r.calibration
    if cal.empty or "ece" not in cal.columns:
        return _check("grey", "Calibration not assessed", "No calibration table in evaluation.json.")
    worst = cal.loc[cal["ece"].astype(float).idxmax()]
    detail = "ECE after temperature scaling: " + ", ".join(f"{c} {num(e)}" for c, e in zip(cal["class"], cal["ece"],
                                                                                           strict=True))
    if not float(worst["ece"]) > ECE_LIMIT:
        return _check("green", "Calibration", detail)
    return _check("amber", "Poorly calibrated", f"{detail} (above {ECE_LIMIT}).",
                  f"A displayed probability can be off by about {100 * float(worst['ece']):.0f} percentage points on "
                  f"average: a 70% for {worst['class']} may not mean 7 in 10 such patients have it.",
                  "Read the output as a ranking, not a probability; recalibrate on local data before quoting it.")


def _leakage_check(data: dict[str, Any]) -> dict[str, str]:
    if not data.get("present"):
        return _check("grey", "Patient leakage not checked", "No manifest.csv in this run.")
    n = data["leaked_patients"]
    if n == 0:
        return _check("green", "No patient leakage", f"0 of {data['n_patients']} patients appear in more than one split.")
    return _check("red", "Patient leakage", f"{n} patient(s) appear in more than one split.",
                  "The test scans of these patients resemble scans the model trained on, so performance is "
                  "overestimated: real patients will fare worse than reported.",
                  "Re-split by patient (remove the 'split' column from the labels CSV) and retrain.")


def _quarantine_check(data: dict[str, Any]) -> dict[str, str]:
    if not data.get("present"):
        return _check("grey", "Quarantine not checked", "No manifest.csv in this run.")
    n = data["quarantine_total"]
    if n == 0:
        return _check("green", "No files quarantined", "Every scan in the folder could be read.")
    reasons = ", ".join(f"{k}: {v}" for k, v in data["quarantine"].items())
    return _check("amber", "Files quarantined", f"{n} file(s) could not be used ({reasons}).",
                  "If the excluded scans share a trait (a device, a site, a protocol), patients like them were "
                  "neither trained on nor tested.",
                  "Review quarantine.csv in the run folder (problem and reason per file); fix or document them.")


def _saliency_checks(explain: dict[str, Any], run_id: str) -> list[dict[str, str]]:
    if not explain.get("present"):
        return [_check("grey", "Saliency not assessed", "No saliency/ folder in this run.",
                       "Where the model looks, and whether it uses shortcuts, is unknown.",
                       f"Run 'medtransfer explain {run_id}' and render this report again.")]
    failed = [s["method"] for s in explain["sanity"] if not s["passed"]]
    sanity = (_check("amber", "Saliency fails sanity check", f"Method(s) {', '.join(failed)} barely change when the "
                     "model's weights are randomised.",
                     "These heat maps may show image edges rather than what the model uses.",
                     "Do not use these heat maps to justify a decision; try another method (--method).")
              if failed else _check("green", "Saliency sanity check passed",
                                    ", ".join(f"{s['method']} {s['score']}" for s in explain["sanity"]) or NOT_PROVIDED))
    items = [i for c in explain["classes"] for i in c["items"]]
    hinted = [i for i in items if i["has_hint"]]
    if not hinted:
        return [sanity, _check("green", "No shortcut signal", f"0 of {len(items)} heat maps concentrate on corners, "
                               "borders or outside the body.")]
    return [sanity, _check("amber", "Shortcut signal", f"{len(hinted)} of {len(items)} heat maps concentrate on "
                           "corners, borders or outside the body (cases " + ", ".join(i["case_id"] for i in hinted[:5])
                           + ").",
                           "The model may rely on markers, text or borders rather than anatomy, and could fail on "
                           "scans from another hospital or device.",
                           "Review the flagged overlays (Explainability); mask burned-in markers, run the transfer "
                           "and shortcut audit, and validate on external data.")]


def limitations(files: RunFiles, ctx: dict[str, Any]) -> list[str]:
    """Limitations revealed by the run itself, in plain sentences."""
    out: list[str] = []
    card, result, data = files.card, files.result, ctx["data"]
    sites = (card.data.get("sites") if card else None) or []
    if len(sites) == 1:
        out.append(f"Single site: all training data come from one site ({sites[0]}); performance elsewhere is unknown.")
    elif not sites:
        out.append("Site not recorded: whether the data span more than one site is unknown.")
    if result is None:
        out.append("No evaluation: no performance figures exist for this model.")
    else:
        out += _result_limitations(result)
    if data.get("present"):
        out += _demographic_limitations(files, data)
    ages = (card.data.get("age_range") if card else None) or []
    if len(ages) == 2 and is_num(ages[0]) and ages[0] >= 18:
        out.append("No paediatric patients in the training data: the model must not be used for children.")
    if ctx["intended_use"] == NOT_PROVIDED:
        out.append("Intended use not stated (config.yaml report.intended_use).")
    out.append("Heat maps show where the model's output is sensitive, not where disease is; they are not a "
               "localisation or segmentation.")
    return out


def _result_limitations(result: Any) -> list[str]:
    out = []
    if result.meta.get("split") != "external":
        out.append("No external validation: the metrics come from a held-out part of the same data source; expect "
                   "lower performance at other sites and on other devices.")
    bad = result.by_group[result.by_group["status"] != "ok"] if "status" in result.by_group else result.by_group.iloc[0:0]
    if len(bad):
        groups = ", ".join(f"{r['attribute']}={r['group']} ({r['n_patients']} patients)" for r in bad.to_dict("records")[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        out.append(f"Subgroups too small to assess (fewer than {result.meta.get('min_group_size', '?')} patients): "
                   f"{groups}{more}.")
    test, train = result.meta.get("prevalence") or {}, result.meta.get("training_prevalence") or {}
    for cls, p in test.items():
        q = train.get(cls)
        if is_num(p) and is_num(q) and abs(p - q) > PREVALENCE_SHIFT:
            out.append(f"Prevalence shift for {cls}: {pct(q)} in training vs {pct(p)} in evaluation; PPV and NPV depend "
                       "on prevalence and will differ again in practice.")
    return out


def _demographic_limitations(files: RunFiles, data: dict[str, Any]) -> list[str]:
    out, df = [], files.manifest.df if files.manifest is not None else pd.DataFrame()
    for col, label in (("sex", "Sex"), ("age", "Age")):
        if col not in df.columns:
            out.append(f"{label} not recorded for any case: subgroup performance by {col} cannot be assessed.")
            continue
        missing = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if missing.any():
            out.append(f"{label} unknown for {int(missing.sum())} of {len(df)} cases ({100 * missing.mean():.0f}%).")
    names = " ".join(str(v) for c in ("site", "manufacturer") if c in df.columns for v in df[c].dropna().unique())
    if "(DEMO)" in names:
        out.append("The data appear synthetic (site names marked DEMO): these numbers describe the software, not a "
                   "clinically usable model.")
    if "manufacturer" in df.columns and df["manufacturer"].nunique() == 1:
        out.append(f"One manufacturer only ({df['manufacturer'].dropna().iloc[0]}): scans from other devices were not seen.")
    return out


# -- reporting guidelines ---------------------------------------------------------------------------------
#: (guideline, item, topic, section the report fills it in, or None: the authors must provide it).
#: Sections that need data which may be absent are named with a condition key: "perf" (evaluation),
#: "explain" (saliency), "external" (external evaluation), "data" (manifest).
ITEMS: tuple[tuple[str, str, str, str | None], ...] = (
    ("CLAIM 2024", "Title/Abstract", "AI methodology identified; structured summary", None),
    ("CLAIM 2024", "Introduction", "Clinical background, intended use and role of the AI", "facts"),
    ("CLAIM 2024", "Study design", "Prospective or retrospective; study goal", None),
    ("CLAIM 2024", "Data", "Data sources", "data"),
    ("CLAIM 2024", "Data", "Eligibility criteria; where and when cases were identified", None),
    ("CLAIM 2024", "Data", "Data preprocessing steps", "model"),
    ("CLAIM 2024", "Data", "Selection of data subsets; exclusions", "data"),
    ("CLAIM 2024", "Data", "De-identification methods", "repro"),
    ("CLAIM 2024", "Data", "Handling of missing data (unknown labels, demographics)", "limitations"),
    ("CLAIM 2024", "Reference standard", "Definition and rationale of the ground truth; annotators; tools; variability", None),
    ("CLAIM 2024", "Data partitions", "Sample size rationale", None),
    ("CLAIM 2024", "Data partitions", "How data were assigned to partitions, with proportions", "data"),
    ("CLAIM 2024", "Data partitions", "Level at which partitions are disjoint (patient)", "data"),
    ("CLAIM 2024", "Model", "Model description: inputs, outputs, architecture", "model"),
    ("CLAIM 2024", "Model", "Software libraries and versions", "repro"),
    ("CLAIM 2024", "Model", "Initialisation of parameters (transfer learning source)", "model"),
    ("CLAIM 2024", "Training", "Training approach, hyperparameters, augmentation", "repro"),
    ("CLAIM 2024", "Training", "Method of selecting the final model", "model"),
    ("CLAIM 2024", "Evaluation", "Performance metrics", "perf"),
    ("CLAIM 2024", "Evaluation", "Measures of uncertainty (confidence intervals)", "perf"),
    ("CLAIM 2024", "Evaluation", "Robustness / subgroup analysis", "subgroups"),
    ("CLAIM 2024", "Evaluation", "Explainability methods and their validation", "explain"),
    ("CLAIM 2024", "Evaluation", "Validation on external data", "external"),
    ("CLAIM 2024", "Results", "Flow of cases, inclusions and exclusions", "data"),
    ("CLAIM 2024", "Results", "Demographic and clinical characteristics per partition", "data"),
    ("CLAIM 2024", "Results", "Performance with precision (95% CI)", "perf"),
    ("CLAIM 2024", "Results", "Failure analysis of misclassified cases", "explain"),
    ("CLAIM 2024", "Discussion", "Limitations, bias, generalisability", "limitations"),
    ("CLAIM 2024", "Other", "Registration, protocol, funding, conflicts, data and code availability", None),
    ("TRIPOD+AI", "3b", "Target population and intended users", "facts"),
    ("TRIPOD+AI", "3c", "Known health inequalities", None),
    ("TRIPOD+AI", "5a", "Data sources", "data"),
    ("TRIPOD+AI", "5b", "Dates of data collection", None),
    ("TRIPOD+AI", "6a-c", "Setting, eligibility, treatments", None),
    ("TRIPOD+AI", "7", "Data preparation and pre-processing", "model"),
    ("TRIPOD+AI", "8a-c", "Outcome definition and how it was assessed", None),
    ("TRIPOD+AI", "10", "Sample size", "data"),
    ("TRIPOD+AI", "11", "Missing data", "limitations"),
    ("TRIPOD+AI", "12a-c", "How data were used; model type and building steps; internal validation", "model"),
    ("TRIPOD+AI", "12e", "Performance measures", "perf"),
    ("TRIPOD+AI", "12f", "Model updating / recalibration (temperature scaling)", "perf"),
    ("TRIPOD+AI", "14", "Fairness: subgroup performance", "subgroups"),
    ("TRIPOD+AI", "15", "Model output and decision thresholds", "perf"),
    ("TRIPOD+AI", "17-19", "Ethics approval, funding, conflicts, protocol, registration, public involvement", None),
    ("TRIPOD+AI", "18e-f", "Data and code sharing", None),
    ("TRIPOD+AI", "20a-c", "Participant flow and characteristics per partition", "data"),
    ("TRIPOD+AI", "22", "Full model specification (reproducible)", "repro"),
    ("TRIPOD+AI", "23a", "Performance estimates with CIs, incl. subgroups", "perf"),
    ("TRIPOD+AI", "26", "Limitations", "limitations"),
    ("TRIPOD+AI", "27a-c", "Usability: handling poor input, user expertise, next steps", None),
)
SECTIONS = {"facts": "Model Facts (page 1)", "data": "Intended use and data", "model": "Model and training",
            "perf": "Performance", "subgroups": "Subgroups", "explain": "Explainability",
            "limitations": "Limitations", "repro": "Reproducibility", "external": "Performance"}


def checklist_items(files: RunFiles, ctx: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """``{"filled": [...], "missing": [...]}``: rows ``guideline, item, topic, where``."""
    present = {"facts": True, "limitations": True, "repro": bool(files.config) or files.card is not None,
               "model": files.card is not None, "data": ctx["data"].get("present", False),
               "perf": files.result is not None, "subgroups": files.result is not None and not files.result.by_group.empty,
               "explain": ctx["explain"].get("present", False),
               "external": files.result is not None and files.result.meta.get("split") == "external"}
    filled, missing = [], []
    for guideline, item, topic, where in ITEMS:
        row = {"guideline": guideline, "item": item, "topic": topic}
        if where is not None and present.get(where):
            filled.append({**row, "where": SECTIONS[where]})
        else:
            missing.append({**row, "where": "authors must provide" if where is None
                            else f"not available from this run ({SECTIONS[where]} is empty)"})
    return {"filled": filled, "missing": missing}
