"""The automatic checks of a run, each **passed**, **flagged** or **not assessed** — decided here, once.

A green "OK" for something that was never checked is worse than no check: a clinician reads it as
evidence. So every check has three states, and "not assessed" always says why and what would make it
assessable. The report's page 1, the console (``medtransfer evaluate``) and ``evaluation.json`` (``checks``)
all read these functions; none of them decides a state on its own.

- :func:`evaluation_checks`: test-set size, subgroup gaps, calibration, evaluation notes;
- :func:`data_checks`: patient leakage, quarantined files;
- :func:`saliency_checks`: the saliency sanity check per method, heat maps on corners/borders;
- :func:`audit_checks`: negative transfer, hospital signal (site probe, leave-one-site-out).

Torch-free (the report renders without torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pandas as pd

from medtransfer.commands import Commands
from medtransfer.format import is_num, num, with_ci

PASSED, FLAGGED, NOT_ASSESSED = "passed", "flagged", "not assessed"
Status = Literal["passed", "flagged", "not assessed"]

#: A test set smaller than this (cases) or with fewer positives per class is flagged as small.
SMALL_TEST_CASES = 100
SMALL_TEST_POSITIVES = 20
#: Expected calibration error above this is flagged.
ECE_LIMIT = 0.1


@dataclass(frozen=True)
class Check:
    """One check and its outcome.

    Attributes:
        key: stable identifier (``test_size``, ``subgroup_gaps``, ``calibration``, ``sanity:gradcam`` ...).
        title: a few words for the reader.
        status: ``passed``, ``flagged`` or ``not assessed``.
        detail: what was found (numbers with intervals), or why it was not assessed.
        meaning: what it means for patients (flagged / not assessed).
        action: what to do: the fix for a flagged check, what would make a not-assessed one assessable;
            commands in it are built by :class:`~medtransfer.commands.Commands` and run as printed.
        severity: ``red`` or ``amber`` for a flagged check (red: do not use the model as it is); "" otherwise.
    """

    key: str
    title: str
    status: Status
    detail: str
    meaning: str = ""
    action: str = ""
    severity: str = ""

    @property
    def level(self) -> str:
        """The traffic light: red/amber when flagged, green when passed, grey when not assessed."""
        if self.status == FLAGGED:
            return self.severity or "amber"
        return "green" if self.status == PASSED else "grey"

    def to_dict(self) -> dict[str, str]:
        """Plain dict (JSON), with the derived ``level``."""
        return {**asdict(self), "level": self.level}


# -- evaluation ---------------------------------------------------------------------------------------------
def evaluation_checks(result: Any, commands: Commands) -> list[Check]:
    """Test-set size, subgroup gaps, calibration and evaluation notes of an :class:`EvaluationResult`."""
    if result is None:
        return [Check("evaluated", "Not evaluated", FLAGGED, "No evaluation.json in this run.",
                      "Nothing is known about how often this model is right or wrong for patients.",
                      f"Run '{commands.evaluate}' and render this report again.", "red")]
    out = [size_check(result), gap_check(result, commands), calibration_check(result)]
    notes = [n for n in (result.meta.get("warnings") or []) if not _is_subgroup_note(n)]
    if notes:
        out.append(Check("evaluation_notes", "Evaluation notes", FLAGGED, " ".join(notes),
                         "Some cases were left out of the numbers above.",
                         "Read the notes and decide whether the excluded cases matter for your patients."))
    return out


def _is_subgroup_note(note: str) -> bool:
    return note.startswith(("subgroup '", "intersection "))


def _class_rows(result: Any) -> pd.DataFrame:
    o = result.overall
    return o[o["class"] != "macro"] if "class" in o.columns else o


def size_check(result: Any) -> Check:
    """Passed with >= 100 cases and >= 20 positives per class; flagged (amber) otherwise, with the widest interval."""
    rows = _class_rows(result)
    n = int(result.meta.get("n_cases") or (rows["n"].max() if len(rows) else 0))
    pos = {str(r["class"]): int(r["n_pos"]) for r in rows.to_dict("records") if is_num(r.get("n_pos"))}
    detail = f"{n} test cases; positives: " + (", ".join(f"{c} {k}" for c, k in pos.items()) or "none")
    if n >= SMALL_TEST_CASES and pos and min(pos.values()) >= SMALL_TEST_POSITIVES:
        return Check("test_size", "Test set size", PASSED, detail)
    meaning = "The intervals are wide."
    if len(rows):
        r = rows.iloc[int(rows["n_pos"].astype(float).argmin())]
        if is_num(r.get("sensitivity_lo")) and is_num(r.get("sensitivity_hi")):
            meaning = (f"The intervals are wide: for patients, the sensitivity for {r['class']} could be anywhere "
                       f"from {float(r['sensitivity_lo']):.2f} to {float(r['sensitivity_hi']):.2f}.")
    return Check("test_size", "Small test set", FLAGGED,
                 f"{detail} (fewer than {SMALL_TEST_CASES} cases or {SMALL_TEST_POSITIVES} positives per class).",
                 meaning, f"Evaluate on at least {SMALL_TEST_CASES} cases with {SMALL_TEST_POSITIVES}+ positives per "
                          "class, preferably from another site, before relying on these numbers.")


def gap_check(result: Any, commands: Commands) -> Check:
    """Subgroup gaps: flagged (red) when a gap's CI excludes zero; passed only when gaps were computed for
    every requested attribute present; not assessed (with why) when there was nothing to compare."""
    requested = list(result.meta.get("subgroups") or [])
    missing = [n.split("'")[1] for n in (result.meta.get("warnings") or []) if n.startswith("subgroup '")]
    gaps = result.gaps if isinstance(result.gaps, pd.DataFrame) else pd.DataFrame()
    computed = gaps[pd.to_numeric(gaps.get("gap", pd.Series(dtype=float)), errors="coerce").notna()] \
        if len(gaps) else gaps
    assessed = sorted(set(computed["attribute"])) if len(computed) else []
    too_small = [a for a in requested if a not in assessed]
    if not len(computed):
        if not requested:
            why = "the data have no sex, age or site information" if missing else "no subgroup was requested"
            todo = commands.how_to_add_subgroups() if missing or not commands.subgroup_columns else \
                f"Run '{commands.evaluate_subgroups}'."
        else:
            why = (f"every group of {', '.join(requested)} had fewer than {result.meta.get('min_group_size', '?')} "
                   "patients or lacked one of the outcomes (see Subgroups)")
            todo = "Evaluate on more data per group, e.g. an external set with these columns."
        return Check("subgroup_gaps", "Subgroup gaps not assessed", NOT_ASSESSED,
                     f"Not assessed: {why}." + (f" Absent from the data: {', '.join(missing)}." if missing and
                                                 requested else ""),
                     "Whether some patients (by sex, age, site) get worse results is unknown.", todo)
    flagged = computed[computed["flagged"].fillna(False).astype(bool)]
    unassessed = ""
    if too_small or missing:
        parts = ([f"{', '.join(too_small)} (groups too small)"] if too_small else []) + \
                ([f"{', '.join(missing)} (not in the data)"] if missing else [])
        unassessed = " Not assessed: " + "; ".join(parts) + "."
    if flagged.empty:
        return Check("subgroup_gaps", "No subgroup gap flagged", PASSED,
                     f"{len(computed)} gap(s) computed for {', '.join(assessed)}; every confidence interval "
                     f"includes zero.{unassessed}")
    g = flagged.sort_values("gap", ascending=False).iloc[0]
    text = "; ".join(f"{x['attribute']} {x['metric']} gap {with_ci(x['gap'], x['gap_lo'], x['gap_hi'])} (worst: "
                     f"{x['worst_group']})" for x in flagged.to_dict("records"))
    return Check("subgroup_gaps", "Subgroup gap flagged", FLAGGED, text + "." + unassessed,
                 f"Patients in group {g['attribute']}={g['worst_group']} get measurably worse results than "
                 f"{g['best_group']} ({g['metric']} {num(g['worst_value'])} vs {num(g['best_value'])}).",
                 f"Do not rely on the model for {g['attribute']}={g['worst_group']} patients until more of their data "
                 "are collected and the gap is re-evaluated.", "red")


def calibration_check(result: Any) -> Check:
    """Passed when every class's ECE <= 0.1; flagged (amber) above; says whether temperature scaling was used."""
    cal = result.calibration
    if cal is None or cal.empty or "ece" not in cal.columns or not pd.to_numeric(cal["ece"], errors="coerce").notna().any():
        return Check("calibration", "Calibration not assessed", NOT_ASSESSED,
                     "Not assessed: no calibration table in evaluation.json.",
                     "Whether a displayed probability matches the observed frequency is unknown.",
                     "Evaluate the run again with this version of medtransfer.")
    ece = pd.to_numeric(cal["ece"], errors="coerce")
    raw = pd.to_numeric(cal.get("ece_uncalibrated", pd.Series(float("nan"), index=cal.index)), errors="coerce")
    worst = cal.loc[ece.idxmax()]
    model = (result.meta.get("model") or {})
    applied = model.get("temperature") is not None
    how = (f"temperature scaling applied (T = {float(model['temperature']):.2f}, chosen on validation)"
           if applied else "no temperature scaling (it did not improve validation calibration)"
           if (model.get("calibration") or {}).get("applied") is False else "no temperature scaling")
    per_class = ", ".join(
        f"{c} {num(e)}" + (f" (before scaling {num(r)})" if applied and is_num(r) else "")
        for c, e, r in zip(cal["class"], ece, raw, strict=True))
    worse = [str(c) for c, e, r in zip(cal["class"], ece, raw, strict=True) if applied and is_num(r) and e > r]
    note = (f" On this data the temperature made calibration worse for {', '.join(worse)}." if worse else "")
    detail = f"ECE: {per_class}; {how}.{note}"
    if not float(worst["ece"]) > ECE_LIMIT:
        return Check("calibration", "Calibration", PASSED, detail)
    return Check("calibration", "Poorly calibrated", FLAGGED, f"{detail} Above {ECE_LIMIT}.",
                 f"A displayed probability can be off by about {100 * float(worst['ece']):.0f} percentage points on "
                 f"average: a 70% for {worst['class']} may not mean 7 in 10 such patients have it.",
                 "Read the output as a ranking, not a probability; recalibrate on local data before quoting it.")


# -- data -----------------------------------------------------------------------------------------------------
def data_checks(leaked_patients: int | None, n_patients: int | None, quarantine: Mapping[str, int] | None
                ) -> list[Check]:
    """Patient leakage across splits and quarantined files (None: no manifest, not assessed)."""
    if leaked_patients is None:
        why = "Not assessed: no manifest.csv in this run."
        todo = "Train the run with 'medtransfer train' (it indexes the data and writes manifest.csv)."
        return [Check("leakage", "Patient leakage not checked", NOT_ASSESSED, why, action=todo),
                Check("quarantine", "Quarantine not checked", NOT_ASSESSED, why, action=todo)]
    out = [Check("leakage", "No patient leakage", PASSED,
                 f"0 of {n_patients} patients appear in more than one split.") if leaked_patients == 0 else
           Check("leakage", "Patient leakage", FLAGGED, f"{leaked_patients} patient(s) appear in more than one split.",
                 "The test scans of these patients resemble scans the model trained on, so performance is "
                 "overestimated: real patients will fare worse than reported.",
                 "Re-split by patient (remove the 'split' column from the labels CSV) and retrain.", "red")]
    total = sum((quarantine or {}).values())
    if total == 0:
        out.append(Check("quarantine", "No files quarantined", PASSED, "Every scan in the folder could be read."))
    else:
        reasons = ", ".join(f"{k}: {v}" for k, v in (quarantine or {}).items())
        out.append(Check("quarantine", "Files quarantined", FLAGGED, f"{total} file(s) could not be used ({reasons}).",
                         "If the excluded scans share a trait (a device, a site, a protocol), patients like them "
                         "were neither trained on nor tested.",
                         "Review quarantine.csv in the run folder (problem and reason per file); fix or document them."))
    return out


# -- saliency -------------------------------------------------------------------------------------------------
def saliency_checks(sanity: Mapping[str, pd.DataFrame], index: pd.DataFrame | None, commands: Commands
                    ) -> list[Check]:
    """The cascading-randomisation sanity check per method, and heat maps on corners/borders/outside the body."""
    if index is None or not len(index):
        return [Check("saliency", "Saliency not assessed", NOT_ASSESSED, "Not assessed: no heat maps in this run.",
                      "Where the model looks, and whether it uses shortcuts, is unknown.",
                      f"Run '{commands.explain}' and render this report again.")]
    out = [sanity_check_of(method, sanity.get(method), commands) for method in sorted(set(index["method"]))]
    hint = index.get("hint", pd.Series("", index=index.index)).fillna("").astype(str)
    hinted = index[hint.ne("") & hint.ne("none")]
    per = ", ".join(f"{m} {int((hinted['method'] == m).sum())} of {int((index['method'] == m).sum())}"
                    for m in sorted(set(index["method"])))
    if hinted.empty:
        out.append(Check("shortcut_heatmaps", "No shortcut signal in heat maps", PASSED,
                         f"Heat maps on corners, borders or outside the body: {per}."))
    else:
        cases = ", ".join(list(dict.fromkeys(hinted["case_id"].astype(str)))[:5])
        out.append(Check("shortcut_heatmaps", "Shortcut signal in heat maps", FLAGGED,
                         f"Heat maps concentrating on corners, borders or outside the body: {per} (cases {cases}).",
                         "The model may rely on markers, text or borders rather than anatomy, and could fail on scans "
                         "from another hospital or device.",
                         f"Review the flagged overlays (Explainability); mask burned-in markers, run '{commands.audit_shortcuts}', "
                         "and validate on external data."))
    return out


def sanity_check_of(method: str, table: pd.DataFrame | None, commands: Commands) -> Check:
    """One method's sanity check from its ``sanity_<method>.csv`` (last row = full randomisation)."""
    key, title = f"sanity:{method}", f"Saliency sanity check ({method})"
    if table is None or table.empty:
        return Check(key, title, NOT_ASSESSED, "Not assessed: the sanity check did not run for these maps.",
                     "Whether these heat maps depend on what the model learned is unknown.",
                     f"Run '{commands.explain}' again (it runs the check once per method).")
    last = table.iloc[-1]
    status = str(last.get("status") or ("passed" if str(last.get("passed")).lower() == "true" else "failed"))
    reason = last.get("reason") if isinstance(last.get("reason"), str) else ""
    if status == "not assessed":
        return Check(key, title, NOT_ASSESSED, f"Not assessed: {reason}.",
                     "Whether these heat maps depend on what the model learned is unknown.",
                     f"Use another method ('{commands.explain}' uses Grad-CAM) or more sanity images.")
    rho = last.get("mean_spearman")
    detail = reason or f"mean Spearman correlation at full randomisation {num(rho, 2)}"
    if status == "passed":
        return Check(key, title, PASSED, f"Maps change when the weights are randomised: {detail}.")
    return Check(key, title, FLAGGED, f"Maps barely change when the weights are randomised: {detail}.",
                 "These heat maps may show image edges rather than what the model uses.",
                 "Do not use these heat maps to justify a decision; try another method (--method).")


# -- audit ----------------------------------------------------------------------------------------------------
def audit_checks(audit: Mapping[str, Any] | None, commands: Commands) -> list[Check]:
    """Negative transfer (transfer audit) and hospital signal (site probe, leave-one-site-out)."""
    audit = audit or {}
    out = []
    t = audit.get("transfer")
    if t:
        negative = [w for w in t.get("warnings") or [] if w.startswith("Negative transfer")]
        eff = (t.get("summary") or {}).get("data_efficiency") or {}
        if negative:
            out.append(Check("transfer", "Negative transfer", FLAGGED, negative[0],
                             "ImageNet pretraining buys nothing here; a simpler model may be as good.",
                             "See 'Does transfer help'; check the preprocessing or prefer the scratch model."))
        elif eff:
            out.append(Check("transfer", "Pretraining helps", PASSED, "The best pretrained strategy reaches "
                             "training from scratch with all the data using less data (transfer audit)."))
        else:
            out.append(Check("transfer", "Transfer not assessed", NOT_ASSESSED,
                             "Not assessed: the transfer audit has no comparison with training from scratch.",
                             action=f"Run '{commands.audit_transfer_quick}'."))
    s = audit.get("shortcuts")
    if s:
        out.append(hospital_check(s, commands))
    return out


def hospital_check(shortcuts: Mapping[str, Any], commands: Commands) -> Check:
    """Passed only when the site probe or leave-one-site-out actually ran and flagged nothing."""
    probe = [r for r in shortcuts.get("probe") or [] if r.get("attribute") in ("site", "manufacturer")]
    loso = list(shortcuts.get("loso") or [])
    ran_probe = [r for r in probe if str(r.get("status")) == "ok"]
    ran_loso = [r for r in loso if str(r.get("status")) == "ok"]
    seen = [r for r in ran_probe if r.get("flagged")]
    drops = [r for r in ran_loso if r.get("flagged")]
    if seen or drops:
        detail = "; ".join([f"features predict {r['attribute']} (balanced accuracy {num(r.get('balanced_accuracy'), 2)},"
                            f" chance {num(r.get('chance'), 2)})" for r in seen]
                           + [f"AUROC at {r['site']} drops by {num(r.get('drop'))} when it is left out of training"
                              for r in drops])
        return Check("hospital_signal", "Hospital signal", FLAGGED, detail + ".",
                     "The model can tell hospitals apart and may not perform the same at a new one.",
                     "Validate on an external site before use; see 'Is the model learning the hospital?'.")
    if not ran_probe and not ran_loso:
        reasons = [f"{r.get('attribute', r.get('site'))}: {r.get('status')}" for r in [*probe, *loso] if r.get("status")]
        why = "; ".join([*reasons, *map(str, shortcuts.get("notes") or [])]) or "the data record no site or manufacturer"
        return Check("hospital_signal", "Hospital signal not assessed", NOT_ASSESSED,
                     f"Not assessed: {why}. The site probe needs 2+ sites with 5+ cases each, leave-one-site-out "
                     "needs 2+ sites.",
                     "Whether the model would perform the same at another hospital is unknown.",
                     "Evaluate on an external site: " + f"'{commands.evaluate_external()}'.")
    parts = ([f"site probe at chance ({', '.join(r['attribute'] for r in ran_probe)})"] if ran_probe else []) + \
            ([f"no leave-one-site-out drop ({len(ran_loso)} site(s))"] if ran_loso else [])
    return Check("hospital_signal", "No hospital signal found", PASSED, "; ".join(parts) + ".")


# -- ordering -------------------------------------------------------------------------------------------------
_ORDER = {"red": 0, "amber": 1, "grey": 2, "green": 3}


def ordered(checks: Sequence[Check]) -> list[Check]:
    """Worst first: red, amber, not assessed, passed (stable within a level)."""
    return sorted(checks, key=lambda c: _ORDER[c.level])
