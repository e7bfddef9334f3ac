"""What an indexed dataset looks like, as counts: ``summary_dict`` (``summary.json``) and ``render_summary``.

Counts only: no paths, no identifiers, so the summary can be shared and pasted into issues.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medtransfer.data.manifest import SPLITS, Manifest

SUBGROUPS = ("sex", "age_band", "site", "view", "modality", "format")
_MAX_VALUES = 12  # sites etc. beyond this are folded into "(other)" in the printed tables


def summary_dict(manifest: Manifest) -> dict[str, Any]:
    """Counts describing a manifest: cases/patients per split and class, subgroups, quarantine, warnings.

    Returns:
        A JSON-serialisable dict: ``task``, ``classes``, ``n_cases``, ``n_patients``, ``n_studies``,
        ``splits`` (per split: ``cases``, ``patients`` and ``per_class`` counts, positives for multi-label),
        ``subgroups`` (column -> value -> cases; blank shown as ``"unknown"``), ``quarantine`` (``total`` and
        ``by_problem``) and ``warnings``.
    """
    df = manifest.df
    splits: dict[str, Any] = {}
    for split in SPLITS:
        part = df[df["split"] == split] if "split" in df.columns else df.iloc[0:0]
        splits[split] = {"cases": len(part), "patients": int(part["patient_key"].nunique()),
                         "per_class": _per_class(part, manifest)}
    quarantine = manifest.quarantine
    by_problem = quarantine["problem"].value_counts().to_dict() if len(quarantine) else {}
    return {
        "task": manifest.task,
        "classes": list(manifest.classes),
        "n_cases": len(df),
        "n_patients": int(df["patient_key"].nunique()),
        "n_studies": int(df["study_key"].nunique()) if "study_key" in df.columns else None,
        "splits": splits,
        "subgroups": {col: _counts(df[col]) for col in SUBGROUPS if col in df.columns},
        "quarantine": {"total": len(quarantine), "by_problem": {str(k): int(v) for k, v in by_problem.items()}},
        "warnings": list(manifest.warnings),
    }


def _per_class(part: pd.DataFrame, manifest: Manifest) -> dict[str, int]:
    if manifest.task == "multilabel":
        return {c: int(pd.to_numeric(part[c], errors="coerce").eq(1).sum()) for c in manifest.classes}
    counts = part["label"].astype(str).value_counts()
    return {c: int(counts.get(c, 0)) for c in manifest.classes}


def _counts(values: pd.Series) -> dict[str, int]:
    text = values.astype(object).where(values.notna(), "").astype(str).replace("", "unknown")
    return {str(k): int(v) for k, v in text.value_counts().sort_index().items()}


def render_summary(manifest: Manifest, console: Console) -> None:
    """Print the summary as rich tables: classes × splits, subgroups, quarantine, warnings.

    Examples:
        >>> render_summary(index_scans("scans/"), Console())  # doctest: +SKIP
    """
    info = summary_dict(manifest)
    # Class names, subgroup values and warnings come from the user's folders, CSV and DICOM headers: escaped,
    # since a '[/x]' in one would be read as rich markup (and stop the CLI with a MarkupError).
    console.print(f"[bold]{info['n_cases']} cases[/] from {info['n_patients']} patients; task {manifest.task}, "
                  f"classes {escape(', '.join(manifest.classes))}", highlight=False, soft_wrap=True)
    console.print(_split_table(info, manifest))
    console.print(_subgroup_table(info))
    if info["quarantine"]["total"]:
        table = Table(title=f"quarantined: {info['quarantine']['total']}", caption="see quarantine.csv")
        table.add_column("problem")
        table.add_column("files", justify="right")
        for problem, n in sorted(info["quarantine"]["by_problem"].items(), key=lambda kv: -kv[1]):
            table.add_row(escape(str(problem)), str(n))
        console.print(table)
    for message in info["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _split_table(info: dict[str, Any], manifest: Manifest) -> Table:
    what = "positives" if manifest.task == "multilabel" else "cases"
    table = Table(title=f"{what} per class and split")
    table.add_column("class")
    for split in (*SPLITS, "total"):
        table.add_column(split, justify="right")
    for cls in manifest.classes:
        per = [info["splits"][s]["per_class"][cls] for s in SPLITS]
        table.add_row(escape(cls), *map(str, per), str(sum(per)))
    cases = [info["splits"][s]["cases"] for s in SPLITS]
    table.add_row("[bold]cases[/]", *map(str, cases), str(sum(cases)), end_section=False)
    table.add_row("[bold]patients[/]", *(str(info["splits"][s]["patients"]) for s in SPLITS), str(info["n_patients"]))
    return table


def _subgroup_table(info: dict[str, Any]) -> Table:
    table = Table(title="subgroups (cases)")
    table.add_column("column")
    table.add_column("value")
    table.add_column("cases", justify="right")
    for col, counts in info["subgroups"].items():
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(items) > _MAX_VALUES:
            rest = sum(n for _, n in items[_MAX_VALUES - 1:])
            items = [*items[: _MAX_VALUES - 1], ("(other)", rest)]
        for i, (value, n) in enumerate(items):
            table.add_row(col if i == 0 else "", escape(str(value)), str(n), end_section=i == len(items) - 1)
    return table
