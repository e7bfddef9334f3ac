"""CLAIM 2024 and TRIPOD+AI, item by item, with an honest status decided from the report's content.

:func:`guideline_items` takes the report's template context (``medtransfer.reports.context.build_context``)
and returns every item of both checklists, numbered as published, each with a short paraphrase (not the
copyrighted wording) and a status:

- ``filled``: the report carries the content; ``where`` names the section and what it shows.
- ``partly``: some of it is there (``where``); ``todo`` says what the authors must add.
- ``provide``: only the authors can write it; ``todo`` says what, in one sentence.

A status follows from content, never from a section merely existing: confidence intervals count only when a
metric has a finite interval, subgroup analysis only when an attribute has two or more groups assessed,
external validation only when the evaluated split is ``external``, explainability only when heat maps exist
*and* a sanity check ran, partitions only when split counts exist and patient leakage was checked, software
versions only when recorded, missing data from the blanks actually found. The context holds values already
formatted for the template, so intervals are read from the ``with_ci`` text (``0.812 (0.701–0.903)``).

Sources (item lists and numbering):

- CLAIM 2024: Tejani AS, Klontzas ME, Gatti AA, et al. Checklist for Artificial Intelligence in Medical
  Imaging (CLAIM): 2024 Update. Radiol Artif Intell 2024;6(4):e240300. doi:10.1148/ryai.240300. 44 items.
- TRIPOD+AI: Collins GS, Moons KGM, Dhiman P, et al. TRIPOD+AI statement: updated guidance for reporting
  clinical prediction models that use regression or machine learning methods. BMJ 2024;385:e078378.
  doi:10.1136/bmj-2023-078378 (checklist: table 2, PMC11019967). 27 items, 52 numbered sub-items.

Numbers and section headings were checked against public transcriptions of those tables: the CLAIM 2024
checklist web pages ("CLAIM 2024 Items", one page per item 1-44) and an independent CLAIM-to-metadata
crosswalk that lists the same 44 titles; for TRIPOD+AI, two independent transcriptions of table 2 that agree
item for item (52 sub-items, predictors 9a-9c: there is no item 9d). Every number below was confirmed in at
least two of them. Paraphrases are ours; check wording against the official checklists before submission.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from medtransfer.commands import Commands
from medtransfer.format import NOT_PROVIDED, is_num

logger = logging.getLogger(__name__)

FILLED, PARTLY, PROVIDE = "filled", "partly", "provide"
STATUSES = (FILLED, PARTLY, PROVIDE)
CLAIM, TRIPOD = "CLAIM 2024", "TRIPOD+AI"

# Report sections, named as their headings read.
FACTS, DATA, MODEL, PERF = "Model Facts", "Intended use and data", "Model and training", "Performance"
SUBGROUPS, EXPLAIN, LIMITS, REPRO = "Subgroups", "Explainability", "Limitations", "Reproducibility"
AUDIT = "Does transfer help, and does it generalise?"

_CI = re.compile(r"\(\s*-?\d+(?:\.\d+)?\s*–\s*-?\d+(?:\.\d+)?\s*\)")  # the interval with_ci() writes
_COUNT = re.compile(r"^\s*(\d+)")

Verdict = tuple[str, str, str]  # (status, where, todo)


# -- facts read once from the context ----------------------------------------------------------------------
class _Facts:
    """What the context shows, reduced to the booleans and phrases the item rules need."""

    def __init__(self, ctx: dict[str, Any]) -> None:
        self.run_id = str(ctx.get("run_id") or "RUN")
        self.commands: Commands = ctx.get("commands") or Commands(self.run_id)
        use = ctx.get("intended_use")
        self.intended_use = "" if not use or use == NOT_PROVIDED else str(use)
        self.model = ctx.get("model") or {}
        self.has_model = bool(self.model.get("present"))
        self.data = ctx.get("data") or {}
        self.has_data = bool(self.data.get("present"))
        self.evaluation = ctx.get("evaluation") or None
        self.external = bool(self.evaluation and self.evaluation.get("external"))
        self.perf = ctx.get("performance") or None
        self.explain = ctx.get("explain") or {}
        self.repro = ctx.get("repro") or {}
        self.training = ctx.get("training") or {}
        self.limitations = list(ctx.get("limitations") or [])
        self.biggest_gap = ctx.get("biggest_gap") or None
        audit = ctx.get("audit") or {}
        self.loso = [r for r in ((audit.get("shortcuts") or {}).get("loso") or []) if r.get("status", "ok") == "ok"]
        self._metrics()
        self._subgroups(ctx.get("subgroups") or {})
        self._demographics()

    def _metrics(self) -> None:
        classes = [c for c in (self.perf or {}).get("classes") or [] if c.get("name") != "macro"]
        self.with_value = _ordered({label for c in classes for label, v in c.get("metrics") or []
                                    if v and v != NOT_PROVIDED})
        self.with_ci = _ordered({label for c in classes for label, v in c.get("metrics") or [] if _CI.search(str(v))})
        self.thresholds = (self.perf or {}).get("thresholds") or []
        self.calibrated = [c for c in classes if (c.get("calibration") or {}).get("ece", NOT_PROVIDED) != NOT_PROVIDED]

    def _subgroups(self, sub: dict[str, Any]) -> None:
        self.subgroup_rows = list(sub.get("rows") or [])
        assessed: dict[str, set[str]] = {}
        for r in self.subgroup_rows:
            if r.get("ok"):
                assessed.setdefault(str(r.get("attribute")), set()).add(str(r.get("group")))
        self.assessed = assessed
        self.compared = sorted(a for a, groups in assessed.items() if len(groups) >= 2)
        self.n_flagged = int(sub.get("n_flagged") or 0)

    def _demographics(self) -> None:
        """Per attribute: known values and the number of blank ('unknown') cases, summed over splits."""
        self.values: dict[str, set[str]] = {}
        self.blanks: dict[str, int] = {}
        attr = ""
        for r in self.data.get("demographics") or []:
            attr = r.get("attribute") or attr
            if r.get("value") == "unknown":
                self.blanks[attr] = self.blanks.get(attr, 0) + sum(_count(c) for c in r.get("cells") or [])
            else:
                self.values.setdefault(attr, set()).add(str(r.get("value")))
        counts = {str(name): values for name, values in self.data.get("counts") or []}
        self.counts = counts
        self.n_cases = sum(v for v in counts.get("cases", []) if is_num(v))
        self.sex_recorded = bool(self.values.get("sex"))
        self.age_recorded = any(a != NOT_PROVIDED for a in self.data.get("ages") or [])

    # phrases ----------------------------------------------------------------------------------------------
    def split_counts(self) -> str:
        splits = self.data.get("splits") or []
        patients = self.counts.get("patients") or []
        return ", ".join(f"{s} {n}" for s, n in zip(splits, patients, strict=False)) + " patients"

    def attributes(self) -> str:
        shown = [a for a in self.values if a]
        return ", ".join(shown) if shown else "no attribute"

    def missing_found(self) -> list[str]:
        of = f" of {self.n_cases}" if self.n_cases else ""
        out = [f"{a} unknown for {n}{of} cases" for a, n in self.blanks.items() if n]
        # a column blank everywhere is already counted above; "not recorded" is for one with no value at all
        out += [f"{a} not recorded" for a, ok, shown in (("sex", self.sex_recorded, "sex"),
                                                        ("age", self.age_recorded, "age_band"))
                if not ok and not self.blanks.get(shown)]
        if self.data.get("quarantine_total"):
            out.append(f"{self.data['quarantine_total']} file(s) quarantined ({_join(self.data.get('quarantine'))})")
        if self.evaluation and self.evaluation.get("n_failed"):
            out.append(f"{self.evaluation['n_failed']} case(s) unreadable at evaluation")
        return out

    def sites(self) -> list[str]:
        return sorted(self.values.get("site") or [])


def _ordered(labels: set[str]) -> list[str]:
    order = ["AUROC", "AUPRC", "Sensitivity", "Specificity", "PPV", "NPV", "F1", "Accuracy"]
    return [x for x in order if x in labels] + sorted(labels - set(order))


def _count(cell: Any) -> int:
    m = _COUNT.match(str(cell))
    return int(m.group(1)) if m else 0


def _float(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if is_num(x) else None


def _join(d: Any) -> str:
    return ", ".join(f"{k}: {v}" for k, v in (d or {}).items())


def _metric_list(labels: list[str]) -> str:
    return ", ".join(x if x in ("AUROC", "AUPRC", "PPV", "NPV", "F1") else x.lower() for x in labels)


# -- rules shared by several items --------------------------------------------------------------------------
def _evaluate_todo(f: _Facts) -> str:
    return f"Run '{f.commands.evaluate}' and render the report again."


def _design_hint(f: _Facts) -> str:
    where = "external testing" if f.external else "internal testing" if f.evaluation else "no testing yet"
    return f"model development by transfer learning, with {where}"


def r_title(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Name the AI technique (e.g. deep learning, transfer learning) in the title and abstract."
    return (PARTLY, f"{FACTS}: {f.model.get('backbone')} pretrained on {f.model.get('pretraining')}, "
                    f"strategy {f.model.get('strategy')}",
            "Name the technique (deep learning, transfer-learned CNN) in the manuscript title and abstract.")


def r_title_tripod(f: _Facts) -> Verdict:
    todo = ("Say in the title that the study develops and/or evaluates a prediction model, for which population "
            "and which outcome.")
    if not f.has_model:
        return PROVIDE, "", todo
    return PARTLY, f"{FACTS}: {f.model.get('task_sentence')}", todo


def r_setting(f: _Facts) -> Verdict:
    sites = f.sites()
    if not sites:
        return PROVIDE, "", "Describe the care setting and the number and location of centres."
    return (PARTLY, f"{DATA}: {len(sites)} site(s): {', '.join(sites)}",
            "Describe the care setting (e.g. emergency, outpatient) and where the centres are.")


def r_abstract(f: _Facts) -> Verdict:
    if not f.evaluation:
        return PROVIDE, "", "Write a structured abstract: design, methods, results with CIs, conclusions."
    return (PARTLY, f"{FACTS}: model, data and headline performance on one page",
            "Write a structured abstract (design, methods, results with CIs, conclusions).")


def r_background(f: _Facts) -> Verdict:
    if f.intended_use:
        return PARTLY, f"{FACTS}: intended use “{f.intended_use}”", "Add the scientific and clinical background."
    where = f"{FACTS}: task sentence only" if f.has_model else ""
    return ((PARTLY if where else PROVIDE), where,
            "State the intended use (config.yaml report.intended_use) and the clinical background.")


def r_intended_use(f: _Facts) -> Verdict:
    pop = f.model.get("population") or {}
    population = f"target population: {pop.get('sentence') or NOT_PROVIDED}" if f.has_model else ""
    if f.intended_use and f.has_model:
        return FILLED, f"{FACTS}: intended use “{f.intended_use}”; {population}", ""
    if f.has_model:
        return (PARTLY, f"{FACTS}: {population}",
                "State the intended use and users in config.yaml report.intended_use and render again.")
    return PROVIDE, "", "Describe the target population, the intended use in the care pathway and the intended users."


def r_sources(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Name the data sources (institutions, public datasets with links) and their fit to the target population."
    sites = f.sites()
    where = (f"{DATA}: folder “{f.data.get('folder')}”, modalities {', '.join(f.data.get('modalities') or []) or NOT_PROVIDED}"
             f", sites: {', '.join(sites) if sites else NOT_PROVIDED}")
    if f.evaluation:
        where += f"; {PERF}: evaluated on the {f.evaluation.get('where')}"
    return PARTLY, where, "Name the institutions or public datasets (with links), why they were chosen and how representative they are."


def r_eligibility(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "State the inclusion and exclusion criteria: how, where and when cases were identified."
    q = f.data.get("quarantine_total") or 0
    found = f"{q} unreadable file(s) excluded ({_join(f.data.get('quarantine'))})" if q else "no file excluded as unreadable"
    return (PARTLY, f"{DATA}: exclusions by the tool: {found}",
            "State the clinical inclusion and exclusion criteria and how, where and when cases were identified.")


def r_preprocessing(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Describe every pre-processing step (reading, windowing, resizing, normalisation)."
    return FILLED, f"{MODEL}: input pipeline: {f.model.get('input')}", ""


def r_data_prep(f: _Facts) -> Verdict:
    if not (f.has_model and f.has_data):
        return r_preprocessing(f)
    q = f.data.get("quarantine_total") or 0
    return (FILLED, f"{MODEL}: one input pipeline for every image ({f.model.get('input')}); {DATA}: every file "
                    f"checked for readability ({q} quarantined)", "")


def r_subsets(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "If only part of the available data was used, say which part and why."
    return (PARTLY, f"{DATA}: splits {', '.join(f.data.get('splits') or [])} and quarantined files",
            "Say whether a subset of the source data was selected, and why.")


def r_deidentification(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Describe how images and metadata were de-identified."
    return (PARTLY, f"{REPRO}: patients appear only as salted-hash keys; DICOM names, IDs and dates never enter the "
                    "run's outputs", "Describe how the source images were de-identified (headers, burned-in text).")


def r_missing(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Describe how missing labels, demographics and unreadable images were handled."
    found = f.missing_found()
    multilabel = f.data.get("task") == "multilabel"
    if found or multilabel:
        extra = " and how blank labels were handled (masked from the loss)" if multilabel else ""
        return (PARTLY, f"{DATA}: " + ("; ".join(found) if found else "multi-label blanks (counts not shown)"),
                f"Say how these were handled (unknown values kept as 'unknown', unreadable files excluded){extra}, "
                "and whether missingness could bias the results.")
    return FILLED, f"{DATA}: no blank {f.attributes()} values and no unreadable file found", ""


def r_acquisition(f: _Facts) -> Verdict:
    shown = {a: sorted(f.values.get(a) or []) for a in ("modality", "manufacturer", "view") if f.values.get(a)}
    if not shown:
        return PROVIDE, "", "Describe the acquisition protocol (device, technique, resolution) per site."
    return (PARTLY, f"{DATA}: " + "; ".join(f"{a} {', '.join(v)}" for a, v in shown.items()),
            "Give the acquisition parameters (e.g. kVp, slice thickness, sequence, resolution) per site and device.")


def r_partitions(f: _Facts) -> Verdict:
    if not (f.has_data and f.data.get("splits") and isinstance(f.data.get("leaked_patients"), int)):
        return PROVIDE, "", "State how cases were assigned to training, validation and test sets, with proportions."
    return (FILLED, f"{DATA}: counts per split ({f.split_counts()}); patient-level split, leakage checked; "
                    f"{REPRO}: split fractions and seed in config.yaml", "")


def r_disjoint(f: _Facts) -> Verdict:
    if not f.has_data or not isinstance(f.data.get("leaked_patients"), int):
        return PROVIDE, "", "State the level at which partitions are disjoint (patient or higher)."
    n, total = f.data["leaked_patients"], f.data.get("n_patients")
    if n == 0:
        return FILLED, f"{DATA}: disjoint at patient level (0 of {total} patients in more than one split)", ""
    return (PARTLY, f"{DATA}: {n} of {total} patients appear in more than one split",
            "Re-split by patient and retrain, or justify partitioning below the patient level.")


def r_sample_size(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Explain how the sample size was determined (e.g. a precision or power calculation)."
    where = f"{DATA}: {f.split_counts()}"
    if f.evaluation:
        where += f"; {PERF}: {f.evaluation.get('n_cases')} cases from {f.evaluation.get('n_patients')} patients tested"
    return PARTLY, where, "Explain how the sample size was determined and why it suffices (e.g. CI width for sensitivity)."


def r_model(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Describe the model: inputs, outputs, architecture."
    return (FILLED, f"{MODEL}: {f.model.get('backbone')} backbone with a new head, {f.model.get('task')} output "
                    f"({', '.join(f.model.get('classes') or [])}), input {f.model.get('input')}", "")


def r_versions(f: _Facts) -> Verdict:
    versions = f.repro.get("versions") or f.model.get("versions") or {}
    if not versions:
        return PROVIDE, "", "List the software libraries and their versions (torch, torchvision, monai, medtransfer)."
    key = ("medtransfer", "torch", "torchvision", "monai", "python")
    names = [k for k in key if k in versions] + [k for k in versions if k not in key]
    shown = ", ".join(f"{k} {versions[k]}" for k in names[:6])
    return FILLED, f"{REPRO}: {len(versions)} versions recorded ({shown}{', …' if len(versions) > 6 else ''})", ""


def r_init(f: _Facts) -> Verdict:
    source = f.model.get("pretraining")
    if not f.has_model or not source or source == NOT_PROVIDED:
        return PROVIDE, "", "State how parameters were initialised (random, or pretrained weights and their source)."
    return (FILLED, f"{MODEL}: transfer learning from {source} (file {f.model.get('pretrained_file')}, sha256 "
                    f"{str(f.model.get('pretrained_sha256'))[:12]})", "")


def r_training(f: _Facts) -> Verdict:
    config = str(f.repro.get("config_yaml") or "")
    has_config, has_rows = config not in ("", NOT_PROVIDED), bool(f.training.get("rows"))
    if has_config and has_rows:
        return (FILLED, f"{MODEL}: per-epoch learning rate and losses; {REPRO}: config.yaml (optimiser, learning "
                        "rate, epochs, augmentation, early stopping, seeds)", "")
    if has_config or has_rows:
        part = f"{REPRO}: config.yaml" if has_config else f"{MODEL}: per-epoch table"
        return PARTLY, part, "Give the full training settings and the per-epoch history (history.csv, config.yaml)."
    return PROVIDE, "", "Describe augmentation, hyperparameters and the stopping criterion."


def r_selection(f: _Facts) -> Verdict:
    best = f.model.get("best_epoch")
    if not f.has_model or best in (None, NOT_PROVIDED):
        return PROVIDE, "", "State how the final model was selected."
    return (FILLED, f"{MODEL}: weights of epoch {best} kept (best validation AUROC {f.model.get('best_val_auroc')})"
                    f"{'; stopped early' if f.model.get('stopped_early') else ''}", "")


def r_ensemble(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "State whether an ensemble was used and how outputs were combined."
    return FILLED, f"{MODEL}: a single model (no ensembling)", ""


def r_metrics(f: _Facts) -> Verdict:
    if not f.with_value:
        return PROVIDE, "", _evaluate_todo(f)
    calibration = "; calibration (ECE, Brier, reliability diagram)" if f.calibrated else ""
    return FILLED, f"{PERF}: {_metric_list(f.with_value)}; ROC and PR curves{calibration}", ""


def r_uncertainty(f: _Facts) -> Verdict:
    if not f.with_value:
        return PROVIDE, "", _evaluate_todo(f)
    if not f.with_ci:
        return (PARTLY, f"{PERF}: point estimates only (no finite interval)",
                f"Re-run '{f.commands.evaluate} --n-boot 1000' to add bootstrap CIs.")
    ev = f.evaluation or {}
    return (FILLED, f"{PERF}: {_metric_list(f.with_ci)} with {ev.get('ci', '95%')} CIs ({ev.get('n_boot')} "
                    "patient-level bootstrap resamples)", "")


def r_diagnostic(f: _Facts) -> Verdict:
    status, where, todo = r_uncertainty(f)
    if status == FILLED and not {"Sensitivity", "Specificity"} <= set(f.with_ci):
        return PARTLY, where, "Report sensitivity and specificity with CIs at the operating threshold."
    if status == FILLED:
        where += "; confusion counts at the stored threshold"
    return status, where, todo


def _subgroup_where(f: _Facts) -> str:
    parts = [f"{a} ({', '.join(sorted(g))})" for a, g in sorted(f.assessed.items()) if a in f.compared]
    flagged = f"; {f.n_flagged} gap(s) flagged" if f.n_flagged else "; no gap flagged"
    return f"{SUBGROUPS}: metrics with CIs by " + "; ".join(parts) + flagged


def r_subgroups(f: _Facts) -> Verdict:
    if f.compared:
        return FILLED, _subgroup_where(f), ""
    if f.subgroup_rows:
        listed = sorted({str(r.get("attribute")) for r in f.subgroup_rows})
        return (PARTLY, f"{SUBGROUPS}: groups by {', '.join(listed)} listed, but no attribute has two groups with "
                        "enough patients to compare",
                "Evaluate on more patients per group (or lower --min-group-size with care) to compare groups.")
    if f.evaluation:
        cmd = f.commands.evaluate_subgroups
        return PROVIDE, "", (f"Re-run '{cmd}'." if cmd else f"The data have no subgroup columns: "
                             f"{f.commands.how_to_add_subgroups()}.")
    return PROVIDE, "", _evaluate_todo(f)


def r_robustness(f: _Facts) -> Verdict:
    status, where, todo = r_subgroups(f)
    if f.loso:
        return FILLED, (where + "; " if status == FILLED else "") + f"{AUDIT}: leave-one-site-out AUROC drop", ""
    return status, where, todo


def r_fairness_results(f: _Facts) -> Verdict:
    status, where, todo = r_uncertainty(f)
    if status != FILLED:
        return status, where, todo
    sub_status, sub_where, sub_todo = r_subgroups(f)
    if sub_status == FILLED:
        return FILLED, f"{where}; {sub_where}", ""
    return PARTLY, where + (f"; {sub_where}" if sub_where else ""), sub_todo


def r_explain(f: _Facts) -> Verdict:
    if not f.explain.get("present"):
        return (PROVIDE, "", f"Run '{f.commands.explain}' (heat maps with a sanity check), or state that "
                             "no explainability method was used.")
    methods = ", ".join(f.explain.get("methods") or []) or "saliency"
    sanity = f.explain.get("sanity") or []
    where = f"{EXPLAIN}: {methods} heat maps for {f.explain.get('n_total')} case(s)"
    if not sanity:
        return PARTLY, where + " without a sanity check", f"Re-run '{f.commands.explain}' so the sanity check runs."
    checks = ", ".join(f"{s.get('method')} score {s.get('score')} ({'passed' if s.get('passed') else 'NOT passed'})"
                       for s in sanity)
    return FILLED, f"{where}; model-randomisation sanity check: {checks}", ""


def r_failures(f: _Facts) -> Verdict:
    items = [i for c in f.explain.get("classes") or [] for i in c.get("items") or []]
    wrong = [i for i in items if i.get("kind") in ("FP", "FN")]
    if not wrong:
        todo = f"Review the misclassified cases (predictions.csv, '{f.commands.explain}') and describe the failure modes."
        return PROVIDE, "", todo
    hinted = sum(1 for i in wrong if i.get("has_hint"))
    return (PARTLY, f"{EXPLAIN}: heat maps of {len(wrong)} false-positive/negative case(s), {hinted} with a shortcut "
                    "hint", "Describe the failure modes a clinician sees in these cases.")


def r_internal(f: _Facts) -> Verdict:
    if f.evaluation and not f.external:
        return (FILLED, f"{PERF}: {f.evaluation.get('where')}, {f.evaluation.get('n_cases')} cases from "
                        f"{f.evaluation.get('n_patients')} patients", "")
    if f.external and f.has_model:
        return (PARTLY, f"{MODEL}: validation AUROC {f.model.get('best_val_auroc')} (model selection only)",
                f"Report internal test performance too: '{f.commands.evaluate}'.")
    return PROVIDE, "", _evaluate_todo(f)


def r_external(f: _Facts) -> Verdict:
    if f.external:
        return (FILLED, f"{PERF}: {f.evaluation.get('where')}, {f.evaluation.get('n_cases')} cases from "
                        f"{f.evaluation.get('n_patients')} patients", "")
    todo = f"Test on data from another site: '{f.commands.evaluate_external()}'."
    if f.loso:
        return PARTLY, f"{AUDIT}: leave-one-site-out evaluation (internal-external)", todo
    return PROVIDE, "", todo


def r_heterogeneity(f: _Facts) -> Verdict:
    if "site" in f.compared or f.loso:
        parts = ([f"{SUBGROUPS}: performance by site with CIs and the site gap"] if "site" in f.compared else [])
        parts += [f"{AUDIT}: leave-one-site-out"] if f.loso else []
        return FILLED, "; ".join(parts), ""
    sites = f.sites()
    if sites:
        return (PARTLY, f"{DATA}: {len(sites)} site(s) recorded ({', '.join(sites)}); per-site performance not compared",
                "Compare performance across sites (needs two or more sites with enough patients), or say it was not examined.")
    return PROVIDE, "", "Describe any heterogeneity of performance across centres, or state that it was not examined."


def r_flow(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Give the numbers of patients and images included and excluded, with a flow diagram."
    labelled = "; ".join(f"{n}: {', '.join(str(v) for v in vals)}" for n, vals in f.counts.items()
                         if n.startswith(("labelled", "positives")))
    where = f"{DATA}: {f.split_counts()}; per class per split ({labelled}); {f.data.get('quarantine_total', 0)} file(s) quarantined"
    if f.evaluation and f.evaluation.get("n_failed"):
        where += f"; {f.evaluation['n_failed']} unreadable at evaluation"
    return PARTLY, where, "Add the counts before the scan folder was assembled (exclusions by criterion) and a flow diagram."


def r_characteristics(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Tabulate demographic and clinical characteristics for each partition."
    where = f"{DATA}: {f.attributes()} per split" + ("; median age (range) per split" if f.age_recorded else "")
    missing = [a for a, ok in (("sex", f.sex_recorded), ("age", f.age_recorded)) if not ok]
    if missing:
        return (PARTLY, where, f"Record {' and '.join(missing)} (labels CSV columns or DICOM tags) or report them from "
                               "the source records.")
    return FILLED, where, ""


def r_characteristics_tripod(f: _Facts) -> Verdict:
    status, where, todo = r_characteristics(f)
    if status == PROVIDE:
        return status, where, todo
    return PARTLY, where, (todo + " " if todo else "") + "Add key dates and the amount of missing data per characteristic."


def r_eval_vs_dev(f: _Facts) -> Verdict:
    if not f.evaluation:
        return PROVIDE, "", _evaluate_todo(f)
    prev = ", ".join(f"{c} {f.evaluation.get('training_prevalence', {}).get(c, NOT_PROVIDED)} vs {p}"
                     for c, p in (f.evaluation.get("prevalence") or {}).items())
    if f.external:
        return (PARTLY, f"{PERF}: prevalence in training vs evaluation ({prev})",
                "Compare the external set with the development data (demographics, devices, outcome).")
    return (FILLED, f"{DATA}: demographics of the test split beside the training split; {PERF}: prevalence "
                    f"training vs test ({prev})", "")


def r_differences(f: _Facts) -> Verdict:
    status, where, todo = r_eval_vs_dev(f)
    if status == FILLED:
        return FILLED, f"{PERF}: {f.evaluation.get('where')} (same source, patient-level split); " + where, ""
    if f.external:
        return PARTLY, where, "Describe differences in setting, eligibility, outcome definition and predictors."
    return status, where, todo


def r_events(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Give the number of participants and outcome events in each analysis."
    where = f"{DATA}: patients, cases and per-class counts per split"
    if not f.perf:
        return PARTLY, where, "Report the participants and events in the evaluation: " + _evaluate_todo(f)
    positives = ", ".join(f"{c.get('name')} {c.get('n_pos')} of {c.get('n')}" for c in f.perf.get("classes") or []
                          if c.get("name") != "macro")
    return FILLED, f"{where}; {PERF}: positives evaluated ({positives})", ""


def r_specification(f: _Facts) -> Verdict:
    sha = f.repro.get("weights_sha256")
    if not f.has_model or not sha or sha == NOT_PROVIDED:
        return PROVIDE, "", "Provide the full model (weights, code, preprocessing) and any restrictions on access."
    return (PARTLY, f"{MODEL} and {REPRO}: backbone, input spec, thresholds, temperature, weights sha256 {sha[:12]}, "
                    "config.yaml", "State where the model can be obtained and any restrictions on access or re-use.")


def r_predictions(f: _Facts) -> Verdict:
    sha = f.repro.get("weights_sha256")
    if not sha or sha == NOT_PROVIDED:
        return PROVIDE, "", "Describe how predictions were calculated (code, model object, API)."
    version = (f.repro.get("versions") or {}).get("medtransfer", NOT_PROVIDED)
    return (FILLED, f"{REPRO}: model.safetensors sha256 {sha[:12]} run by medtransfer {version} with the recorded "
                    "config", "")


def r_predictors(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Describe the choice of predictors."
    return FILLED, f"{MODEL}: the image is the only input ({f.model.get('input')})", ""


def r_predictor_definition(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Define the predictors and how and when they were measured."
    return (PARTLY, f"{MODEL}: input images ({f.model.get('input')})",
            "State when the images were acquired relative to the outcome assessment.")


def r_predictor_assessors(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "If predictors need human interpretation, describe the assessors."
    return FILLED, f"{MODEL}: not applicable: the predictor is the image itself, not a reader's interpretation", ""


def r_predictor_handling(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Describe rescaling, transformation and standardisation of the inputs."
    return FILLED, f"{MODEL}: {f.model.get('input')}", ""


def r_outcome(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Define the outcome, how and when it was assessed, and whether consistently across groups."
    return (PARTLY, f"{FACTS}: {f.model.get('task_sentence')}",
            "Define each class, how and when the label was assessed, and whether consistently across groups.")


def r_model_building(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Specify the model type, its rationale, the building steps, tuning and internal validation."
    config = f"; {REPRO}: all settings in config.yaml" if r_training(f)[0] != PROVIDE else ""
    return (PARTLY, f"{MODEL}: {f.model.get('backbone')}, strategy {f.model.get('strategy')}, epoch kept by "
                    f"validation AUROC on the 'val' split{config}",
            "Give the rationale for the backbone and strategy and any hyperparameter search.")


def r_updating(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Describe any model updating, e.g. recalibration."
    t = _float(f.model.get("temperature"))
    if t is not None and abs(t - 1.0) > 1e-6:
        return FILLED, f"{MODEL}: temperature scaling fitted on the validation split (T = {t:.3f})", ""
    # T = 1 (or none) leaves the probabilities as the network gives them: that is no updating, not recalibration.
    return FILLED, f"{MODEL}: no updating (temperature {f.model.get('temperature')}: probabilities uncalibrated)", ""


def r_updating_results(f: _Facts) -> Verdict:
    status, where, todo = r_updating(f)
    if status == PROVIDE or "no updating" in where:
        return status, where, todo
    if f.calibrated:
        return FILLED, f"{where}; {PERF}: ECE and Brier before and after scaling", ""
    return PARTLY, where, "Report the calibration before and after updating: " + _evaluate_todo(f)


def r_imbalance(f: _Facts) -> Verdict:
    config = str(f.repro.get("config_yaml") or "")
    m = re.search(r"^\s*class_weights:\s*(true|false)\s*$", config, re.MULTILINE)
    if not m:
        return PROVIDE, "", "State whether class-imbalance methods were used, why and how."
    used = m.group(1) == "true"
    where = f"{REPRO}: config.yaml train.class_weights: {m.group(1)}"
    if not used:
        return FILLED, where + " (no class-imbalance method)", ""
    return (PARTLY, where + " (positives weighted by the negative/positive ratio)",
            "Say why class weighting was used and that probabilities were recalibrated by temperature scaling.")


def r_output(f: _Facts) -> Verdict:
    if not f.has_model:
        return PROVIDE, "", "Specify the output (probabilities, classes) and how thresholds were chosen."
    if f.thresholds:
        how = "; ".join(f"{t.get('class')} ≥ {t.get('threshold')} ({t.get('method')}, {t.get('source')})" for t in f.thresholds)
        return FILLED, f"{FACTS} and {PERF}: a probability per class and a decision at the threshold: {how}", ""
    return PARTLY, f"{FACTS}: a probability per class", "Choose and report decision thresholds: " + _evaluate_todo(f)


def r_limitations(f: _Facts) -> Verdict:
    if not f.limitations:
        return PROVIDE, "", "Discuss limitations: bias, statistical uncertainty and generalisability."
    return (PARTLY, f"{LIMITS}: {len(f.limitations)} limitation(s) found in the run",
            "Add what the tool cannot know: case selection, label quality, other sources of bias.")


def r_implications(f: _Facts) -> Verdict:
    if f.intended_use:
        return PARTLY, f"{FACTS}: intended use and directions for use", "Discuss the implications for clinical practice."
    return PROVIDE, "", "State the intended use (config.yaml report.intended_use) and discuss implications for practice."


def r_protocol_details(f: _Facts) -> Verdict:
    if str(f.repro.get("config_yaml") or NOT_PROVIDED) == NOT_PROVIDED:
        return PROVIDE, "", "Cite where the study protocol and technical details can be accessed."
    return (PARTLY, f"{REPRO}: configuration, seeds and hashes (technical details)",
            "Cite where the full study protocol can be accessed.")


def r_poor_input(f: _Facts) -> Verdict:
    if not f.has_data:
        return PROVIDE, "", "Describe how poor-quality or unavailable images should be assessed and handled in use."
    return (PARTLY, f"{DATA}: unreadable files are quarantined; {FACTS}: checks before trusting an output",
            "Describe how poor-quality or missing images should be handled when the model is used.")


def r_interpretation(f: _Facts) -> Verdict:
    gap = f" (e.g. {f.biggest_gap['text']})" if f.biggest_gap else ""
    return PROVIDE, "", f"Interpret the main results, including fairness{gap}, against the objectives and prior studies."


def r_design(f: _Facts) -> Verdict:
    return PROVIDE, "", f"State the study goal, e.g. “{_design_hint(f)}”."


def r_next_steps(f: _Facts) -> Verdict:
    hint = "" if f.external else " (e.g. external validation at another site)"
    return PROVIDE, "", f"Discuss the next steps for research{hint}."


def r_code_sharing(f: _Facts) -> Verdict:
    version = (f.repro.get("versions") or {}).get("medtransfer")
    cite = f" (medtransfer {version} and config.yaml sha256 {str(f.repro.get('config_sha256'))[:12]})" if version else ""
    return PROVIDE, "", f"State where the analysis code{cite} can be obtained."


def r_availability(f: _Facts) -> Verdict:
    sha = f.repro.get("weights_sha256")
    cite = f" (weights sha256 {sha[:12]})" if sha and sha != NOT_PROVIDED else ""
    return PROVIDE, "", f"State where the software, trained model{cite} and data can be obtained, or why not."


def _provide(todo: str) -> Callable[[_Facts], Verdict]:
    return lambda _f: (PROVIDE, "", todo)


# -- the checklists, numbered as published --------------------------------------------------------------------
Rule = Callable[[_Facts], Verdict]
M, R = "Methods", "Results"
CLAIM_ITEMS: tuple[tuple[str, str, str, Rule], ...] = (
    ("1", "Title/Abstract", "AI study identified; category of technique named (e.g. deep learning)", r_title),
    ("2", "Abstract", "Structured summary of design, methods, results and conclusions", r_abstract),
    ("3", "Introduction", "Scientific/clinical background; intended use and role of the AI", r_background),
    ("4", "Introduction", "Aims, objectives and hypotheses", _provide("State the study aims, objectives and hypotheses.")),
    ("5", f"{M} — Study design", "Prospective or retrospective study",
     _provide("State whether data were collected prospectively or retrospectively.")),
    ("6", f"{M} — Study design", "Study goal (e.g. model development, feasibility, non-inferiority)", r_design),
    ("7", f"{M} — Data", "Data sources and their fit to the intended use", r_sources),
    ("8", f"{M} — Data", "Inclusion and exclusion criteria", r_eligibility),
    ("9", f"{M} — Data", "Data pre-processing", r_preprocessing),
    ("10", f"{M} — Data", "Selection of data subsets, if any", r_subsets),
    ("11", f"{M} — Data", "De-identification methods", r_deidentification),
    ("12", f"{M} — Data", "Handling of missing data", r_missing),
    ("13", f"{M} — Data", "Image acquisition protocol", r_acquisition),
    ("14", f"{M} — Reference standard", "Method(s) used to obtain the reference standard",
     _provide("Define how the labels (reference standard) were obtained, in enough detail to replicate.")),
    ("15", f"{M} — Reference standard", "Rationale for the reference standard chosen",
     _provide("Explain why this reference standard was chosen over alternatives.")),
    ("16", f"{M} — Reference standard", "Source of annotations; annotators' qualifications",
     _provide("Say who annotated the images, their qualifications and instructions.")),
    ("17", f"{M} — Reference standard", "How the test set was annotated",
     _provide("Describe how the test set was annotated (readers, software and version, report mining).")),
    ("18", f"{M} — Reference standard", "Inter- and intra-rater variability of annotations",
     _provide("Report inter-/intra-rater agreement and how disagreements were resolved.")),
    ("19", f"{M} — Data partitions", "How data were assigned to partitions, with proportions", r_partitions),
    ("20", f"{M} — Data partitions", "Level at which partitions are disjoint (patient or higher)", r_disjoint),
    ("21", f"{M} — Testing data", "Intended sample size and how it was determined", r_sample_size),
    ("22", f"{M} — Model", "Detailed model description: inputs, outputs, architecture", r_model),
    ("23", f"{M} — Model", "Software libraries, frameworks and packages (with versions)", r_versions),
    ("24", f"{M} — Model", "Initialisation of model parameters (e.g. transfer learning)", r_init),
    ("25", f"{M} — Training", "Training details: augmentation, hyperparameters, stopping", r_training),
    ("26", f"{M} — Training", "Method of selecting the final model", r_selection),
    ("27", f"{M} — Training", "Ensembling techniques, if used", r_ensemble),
    ("28", f"{M} — Evaluation", "Metrics of model performance", r_metrics),
    ("29", f"{M} — Evaluation", "Statistical measures of significance and uncertainty", r_uncertainty),
    ("30", f"{M} — Evaluation", "Robustness or sensitivity analysis", r_robustness),
    ("31", f"{M} — Evaluation", "Explainability methods and how they were validated", r_explain),
    ("32", f"{M} — Evaluation", "Evaluation on internal data", r_internal),
    ("33", f"{M} — Evaluation", "Testing on external data", r_external),
    ("34", f"{M} — Evaluation", "Clinical trial registration",
     _provide("Give the trial registration number and registry, or state that none applies.")),
    ("35", f"{R} — Data", "Patients/examinations included and excluded (flow)", r_flow),
    ("36", f"{R} — Data", "Demographic and clinical characteristics per partition", r_characteristics),
    ("37", f"{R} — Model performance", "Performance metrics with measures of statistical uncertainty", r_uncertainty),
    ("38", f"{R} — Model performance", "Estimates of diagnostic performance and their precision", r_diagnostic),
    ("39", f"{R} — Model performance", "Failure analysis of incorrect results", r_failures),
    ("40", "Discussion", "Study limitations (bias, uncertainty, generalisability)", r_limitations),
    ("41", "Discussion", "Implications for practice, incl. intended use and clinical role", r_implications),
    ("42", "Other information", "Reference to the full protocol or further technical details", r_protocol_details),
    ("43", "Other information", "Availability of software, trained model and data", r_availability),
    ("44", "Other information", "Sources of funding and other support; role of funders",
     _provide("Name the funding sources and the role of the funders.")),
)

_OS = "Open science"
TRIPOD_ITEMS: tuple[tuple[str, str, str, Rule], ...] = (
    ("1", "Title", "Developing/evaluating a prediction model; target population; outcome", r_title_tripod),
    ("2", "Abstract", "Abstract per the TRIPOD+AI for Abstracts checklist", r_abstract),
    ("3a", "Introduction — Background", "Healthcare context, rationale, existing models",
     _provide("Explain the healthcare context (diagnostic), the rationale and existing models.")),
    ("3b", "Introduction — Background", "Target population, intended purpose and intended users", r_intended_use),
    ("3c", "Introduction — Background", "Known health inequalities between sociodemographic groups",
     _provide("Describe known health inequalities relevant to this condition and population.")),
    ("4", "Introduction — Objectives", "Objectives: development, evaluation or both",
     _provide("State the objectives and whether the study develops, evaluates or both.")),
    ("5a", f"{M} — Data", "Data sources for development and evaluation; representativeness", r_sources),
    ("5b", f"{M} — Data", "Dates of the data (start and end of accrual)",
     _provide("Give the start and end dates of the scans used (and follow-up, if any).")),
    ("6a", f"{M} — Participants", "Study setting; number and location of centres", r_setting),
    ("6b", f"{M} — Participants", "Eligibility criteria", r_eligibility),
    ("6c", f"{M} — Participants", "Treatments received and how they were handled",
     _provide("Describe relevant treatments, or state that none affect the images or labels.")),
    ("7", f"{M} — Data preparation", "Pre-processing and quality checks; similar across groups", r_data_prep),
    ("8a", f"{M} — Outcome", "Outcome definition, time horizon, how and when assessed", r_outcome),
    ("8b", f"{M} — Outcome", "Qualifications and demographics of outcome assessors",
     _provide("Describe the qualifications (and demographics) of those who assigned the labels.")),
    ("8c", f"{M} — Outcome", "Blinding of outcome assessment",
     _provide("Report whether label assessors were blinded (e.g. to other findings).")),
    ("9a", f"{M} — Predictors", "Choice of initial predictors and any pre-selection", r_predictors),
    ("9b", f"{M} — Predictors", "Definition of predictors; how and when measured", r_predictor_definition),
    ("9c", f"{M} — Predictors", "Qualifications of predictor assessors (if subjective)", r_predictor_assessors),
    ("10", f"{M} — Sample size", "How the study size was arrived at, and why it suffices", r_sample_size),
    ("11", f"{M} — Missing data", "How missing data were handled; reasons for omissions", r_missing),
    ("12a", f"{M} — Analytical methods", "How data were used, including partitioning", r_partitions),
    ("12b", f"{M} — Analytical methods", "Handling of predictors (rescaling, transformation, standardisation)",
     r_predictor_handling),
    ("12c", f"{M} — Analytical methods", "Model type, rationale, building steps, tuning, internal validation",
     r_model_building),
    ("12d", f"{M} — Analytical methods", "Heterogeneity across clusters (e.g. hospitals)", r_heterogeneity),
    ("12e", f"{M} — Analytical methods", "Performance measures and plots", r_metrics),
    ("12f", f"{M} — Analytical methods", "Model updating (e.g. recalibration)", r_updating),
    ("12g", f"{M} — Analytical methods", "How predictions were calculated for evaluation", r_predictions),
    ("13", f"{M} — Class imbalance", "Class-imbalance methods, why and how", r_imbalance),
    ("14", f"{M} — Fairness", "Approaches used to address model fairness", r_subgroups),
    ("15", f"{M} — Model output", "Model output and how thresholds were identified", r_output),
    ("16", f"{M} — Training versus evaluation", "Differences between development and evaluation data", r_differences),
    ("17", f"{M} — Ethical approval", "Ethics committee approval and consent",
     _provide("Name the ethics committee and describe consent or its waiver.")),
    ("18a", f"{_OS} — Funding", "Source of funding and role of funders",
     _provide("Name the funding sources and the funders' role.")),
    ("18b", f"{_OS} — Conflicts of interest", "Conflicts of interest", _provide("Declare conflicts of interest.")),
    ("18c", f"{_OS} — Protocol", "Where the protocol can be accessed",
     _provide("Say where the protocol can be accessed, or that none was prepared.")),
    ("18d", f"{_OS} — Registration", "Study registration",
     _provide("Give the registry and number, or state that the study was not registered.")),
    ("18e", f"{_OS} — Data sharing", "Availability of the study data",
     _provide("State whether and how the study data can be accessed.")),
    ("18f", f"{_OS} — Code sharing", "Availability of the analytical code", r_code_sharing),
    ("19", "Patient and public involvement", "Patient and public involvement",
     _provide("Describe patient and public involvement, or state there was none.")),
    ("20a", f"{R} — Participants", "Flow of participants, with and without the outcome", r_flow),
    ("20b", f"{R} — Participants", "Characteristics overall and per source, incl. missing data",
     r_characteristics_tripod),
    ("20c", f"{R} — Participants", "Evaluation vs development data: distribution of key variables", r_eval_vs_dev),
    ("21", f"{R} — Model development", "Participants and outcome events in each analysis", r_events),
    ("22", f"{R} — Model specification", "Full model details; restrictions on access", r_specification),
    ("23a", f"{R} — Model performance", "Performance with CIs, incl. key subgroups", r_fairness_results),
    ("23b", f"{R} — Model performance", "Heterogeneity of performance across clusters", r_heterogeneity),
    ("24", f"{R} — Model updating", "Results of any model updating", r_updating_results),
    ("25", "Discussion — Interpretation", "Overall interpretation, including fairness", r_interpretation),
    ("26", "Discussion — Limitations", "Limitations and their effect on bias, uncertainty, generalisability",
     r_limitations),
    ("27a", "Discussion — Usability", "Handling of poor-quality or unavailable input in use", r_poor_input),
    ("27b", "Discussion — Usability", "User interaction and expertise required",
     _provide("Say whether users interact with the input or output, and the expertise they need.")),
    ("27c", "Discussion — Usability", "Next steps for research (applicability, generalisability)", r_next_steps),
)


def guideline_items(ctx: dict[str, Any]) -> dict[str, Any]:
    """Every CLAIM 2024 and TRIPOD+AI item with its status, from the report's template context.

    Args:
        ctx: the context of :func:`medtransfer.reports.context.build_context` (keys used: run_id, intended_use,
            model, data, training, performance, subgroups, explain, evaluation, audit, limitations, repro,
            biggest_gap; any may be missing or None, and then the items that need it are "provide").

    Returns:
        ``{"claim": [rows], "tripod": [rows], "counts": {"claim": {...}, "tripod": {...}}}``; a row is
        ``{"guideline", "item", "section", "topic", "status", "where", "todo"}`` with ``status`` one of
        ``filled``, ``partly``, ``provide``; counts hold ``filled``, ``partly``, ``provide`` and ``total``.

    Examples:
        >>> out = guideline_items({})
        >>> len(out["claim"]), len(out["tripod"]), out["counts"]["claim"]["provide"]
        (44, 52, 44)
    """
    facts = _Facts(ctx)
    out: dict[str, Any] = {"claim": _rows(CLAIM, CLAIM_ITEMS, facts), "tripod": _rows(TRIPOD, TRIPOD_ITEMS, facts)}
    out["counts"] = {key: {**{s: sum(r["status"] == s for r in out[key]) for s in STATUSES}, "total": len(out[key])}
                     for key in ("claim", "tripod")}
    logger.debug("guidelines: CLAIM %s, TRIPOD+AI %s", out["counts"]["claim"], out["counts"]["tripod"])
    return out


def _rows(guideline: str, items: tuple[tuple[str, str, str, Rule], ...], facts: _Facts) -> list[dict[str, str]]:
    rows = []
    for item, section, topic, rule in items:
        status, where, todo = rule(facts)
        rows.append({"guideline": guideline, "item": item, "section": section, "topic": topic, "status": status,
                     "where": where, "todo": todo})
    return rows
