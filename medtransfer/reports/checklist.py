"""The report's page-1 checks and its limitations, read from a run's files.

- :func:`warnings`: every automatic check of :mod:`medtransfer.checks` (passed / flagged / not assessed,
  decided there, once), with what it means for patients and what to do; commands from :func:`commands_for`.
- :func:`limitations`: limitations the run itself reveals (single site, small subgroups, prevalence shift,
  no external validation, synthetic or unknown demographics, populations absent from training).

The reporting-guideline appendix (CLAIM 2024, TRIPOD+AI) is :mod:`medtransfer.reports.guidelines`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from medtransfer import checks
from medtransfer.commands import Commands
from medtransfer.format import NOT_PROVIDED, is_num, pct
from medtransfer.reports.files import RunFiles

PREVALENCE_SHIFT = 0.10


def commands_for(files: RunFiles) -> Commands:
    """Suggested commands for this run: its real path, and the subgroup columns its data have."""
    df = files.manifest.df if files.manifest is not None else pd.DataFrame()
    return Commands.for_run(files.run_dir, [c for c in df.columns if df[c].notna().any()])


def warnings(files: RunFiles, ctx: dict[str, Any]) -> list[dict[str, str]]:
    """Every automatic check (:mod:`medtransfer.checks`) of the run as plain dicts, worst first."""
    cmds = ctx["commands"]
    data = ctx["data"]
    present = data.get("present", False)
    found = [*checks.evaluation_checks(files.result, cmds),
             *checks.data_checks(data["leaked_patients"] if present else None, data.get("n_patients"),
                                 data.get("quarantine") if present else None),
             *checks.saliency_checks(files.sanity, files.saliency, cmds),
             *checks.audit_checks(files.audit, cmds)]
    return [c.to_dict() for c in checks.ordered(found)]


def limitations(files: RunFiles, ctx: dict[str, Any]) -> list[str]:
    """Limitations revealed by the run itself, in plain sentences."""
    out: list[str] = []
    card, result, data = files.card, files.result, ctx["data"]
    sites = [str(s) for s in ((card.data.get("sites") if card else None) or []) if str(s).strip()]
    if len(sites) == 1:
        out.append(f"Single site: all training data come from one site ({sites[0]}); performance elsewhere is unknown.")
    elif not sites:
        out.append("Site not recorded: whether the data span more than one site is unknown; performance at another "
                   "hospital is unknown.")
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
