"""What an indexed dataset looks like, as counts: ``summary_dict`` (``summary.json``) and ``render_summary``.

Counts only: no paths, no identifiers, so the summary can be shared and pasted into issues. Quarantine
reasons are included (they name the problem, never the file), with any mention of the file's own path removed
in case a decoder's message quoted it.

A labelled manifest is shown as classes x splits; an unlabelled one (the inventory of a folder without labels)
as what was found: cases, files, series, kinds of image, sizes, modalities, views, demographics, patients.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medtransfer.data.manifest import SPLITS, UNLABELLED_HINT, Manifest

SUBGROUPS = ("sex", "age_band", "site", "view", "modality", "format")
#: What the inventory of a folder shows, in this order: what kind of scans, then who they are from.
INVENTORY = ("kind", "size", "modality", "view", "format", "photometric", "manufacturer", "site", "sex", "age_band")
_MAX_VALUES = 12  # sites etc. beyond this are folded into "(other)" in the printed tables
_REASONS_PER_PROBLEM = 3  # distinct quarantine reasons kept per problem in summary.json
_REASON_CHARS = 160  # a reason longer than this is cut in the printed table (quarantine.csv has it whole)


def summary_dict(manifest: Manifest) -> dict[str, Any]:
    """Counts describing a manifest: cases/patients per split and class, subgroups, quarantine, warnings.

    Returns:
        A JSON-serialisable dict: ``task``, ``classes``, ``n_cases``, ``n_files`` (files the cases use; each
        slice of a series counts), ``n_series`` (multi-file series read as one volume), ``n_patients``,
        ``n_studies``, ``splits`` (per split: ``cases``, ``patients`` and ``per_class`` counts, positives for
        multi-label; empty for an unlabelled inventory, which is not split), ``subgroups`` (column -> value ->
        cases; blank shown as ``"unknown"``), ``inventory`` (the same for :data:`INVENTORY`, where ``kind`` is
        2D image / multi-frame or 3D file / series and ``size`` is Rows x Columns, x frames or slices for
        volumes), ``age`` (``known`` cases, ``min``, ``median``, ``max`` in years, or None), ``quarantine``
        (``total``, ``by_problem`` and ``reasons``: up to three distinct reasons per problem, most frequent
        first) and ``warnings``.
    """
    df = manifest.df
    splits: dict[str, Any] = {}
    for split in SPLITS if manifest.labelled else ():
        part = df[df["split"] == split] if "split" in df.columns else df.iloc[0:0]
        splits[split] = {"cases": len(part), "patients": int(part["patient_key"].nunique()),
                         "per_class": _per_class(part, manifest)}
    files = df["files"].fillna("").astype(str) if "files" in df.columns else pd.Series([""] * len(df))
    columns = _inventory_columns(df)
    return {
        "task": manifest.task,
        "classes": list(manifest.classes),
        "n_cases": len(df),
        "n_files": int(sum(len([f for f in x.split(";") if f]) or 1 for x in files)),
        "n_series": int((files != "").sum()),
        "n_patients": int(df["patient_key"].nunique()),
        "n_studies": int(df["study_key"].nunique()) if "study_key" in df.columns else None,
        "splits": splits,
        "subgroups": {col: _counts(df[col]) for col in SUBGROUPS if col in df.columns},
        "inventory": {col: _counts(values) for col, values in columns.items()},
        "age": _age(df),
        "quarantine": _quarantine(manifest.quarantine),
        "warnings": list(manifest.warnings),
    }


def _per_class(part: pd.DataFrame, manifest: Manifest) -> dict[str, int]:
    if manifest.task == "multilabel":
        return {c: int(pd.to_numeric(part[c], errors="coerce").eq(1).sum()) for c in manifest.classes}
    if not manifest.classes:
        return {}
    counts = part["label"].astype(str).value_counts()
    return {c: int(counts.get(c, 0)) for c in manifest.classes}


def _counts(values: pd.Series) -> dict[str, int]:
    text = values.astype(object).where(values.notna(), "").astype(str).replace("", "unknown")
    return {str(k): int(v) for k, v in text.value_counts().sort_index().items()}


def _inventory_columns(df: pd.DataFrame) -> dict[str, pd.Series]:
    """The :data:`INVENTORY` columns present, with ``kind`` and ``size`` derived from files/frames/rows/cols."""
    out: dict[str, pd.Series] = {}
    if {"files", "frames"} <= set(df.columns):
        series = df["files"].fillna("").astype(str) != ""
        frames = pd.to_numeric(df["frames"], errors="coerce").fillna(1)
        out["kind"] = pd.Series(["series (volume)" if s else "multi-frame or 3D file" if f > 1 else "2D image"
                                 for s, f in zip(series, frames, strict=True)], index=df.index, dtype=object)
    if {"rows", "cols"} <= set(df.columns):
        rows, cols = (pd.to_numeric(df[c], errors="coerce") for c in ("rows", "cols"))
        depth = pd.to_numeric(df["frames"], errors="coerce").fillna(1) if "frames" in df else pd.Series(1, df.index)
        out["size"] = pd.Series([_size(r, c, d) for r, c, d in zip(rows, cols, depth, strict=True)], index=df.index,
                                dtype=object)
    for col in INVENTORY:
        if col not in out and col in df.columns:
            out[col] = df[col]
    return {col: out[col] for col in INVENTORY if col in out}


def _size(rows: float, cols: float, depth: float) -> str:
    """``RowsxColumns``, then ``xN`` frames or slices for a volume; blank when the header had no size."""
    if rows != rows or cols != cols:
        return ""
    return f"{int(rows)}x{int(cols)}" + (f"x{int(depth)}" if depth > 1 else "")


def _age(df: pd.DataFrame) -> dict[str, float | int] | None:
    ages = pd.to_numeric(df["age"], errors="coerce").dropna() if "age" in df.columns else pd.Series(dtype=float)
    if ages.empty:
        return None
    return {"known": len(ages), "min": round(float(ages.min()), 1), "median": round(float(ages.median()), 1),
            "max": round(float(ages.max()), 1)}


def _quarantine(quarantine: pd.DataFrame) -> dict[str, Any]:
    """Total, files per problem, and the most frequent distinct reasons per problem (file paths removed)."""
    if not len(quarantine):
        return {"total": 0, "by_problem": {}, "reasons": {}}
    rows = quarantine.assign(reason=[_scrub(str(r), str(p)) for r, p in zip(quarantine["reason"],
                                                                          quarantine["path"], strict=True)])
    by_problem = rows["problem"].astype(str).value_counts()
    reasons = {str(problem): rows.loc[rows["problem"].astype(str) == problem, "reason"].value_counts()
               .index[:_REASONS_PER_PROBLEM].tolist() for problem in by_problem.index}
    return {"total": len(quarantine), "by_problem": {str(k): int(v) for k, v in by_problem.items()},
            "reasons": reasons}


def _scrub(reason: str, path: str) -> str:
    """The reason without the file's own path or name, which a decoder's message may quote (names can be PHI)."""
    for token in sorted({path, posixpath.basename(path)} - {""}, key=len, reverse=True):
        reason = reason.replace(token, "<file>")
    return reason


def render_summary(manifest: Manifest, console: Console) -> None:
    """Print the summary as rich tables: classes × splits (or, without labels, the inventory), quarantine, warnings.

    Examples:
        >>> render_summary(index_scans("scans/"), Console())  # doctest: +SKIP
    """
    info = summary_dict(manifest)
    # Class names, subgroup values and warnings come from the user's folders, CSV and DICOM headers: escaped,
    # since a '[/x]' in one would be read as rich markup (and stop the CLI with a MarkupError).
    if manifest.labelled:
        console.print(f"[bold]{info['n_cases']} cases[/] from {info['n_patients']} patients; task {manifest.task}, "
                      f"classes {escape(', '.join(manifest.classes))}", highlight=False, soft_wrap=True)
        console.print(_split_table(info, manifest))
        console.print(_counts_table("subgroups (cases)", info["subgroups"]))
    else:
        console.print(_inventory_line(info), highlight=False, soft_wrap=True)
        console.print(_inventory_table(info["inventory"]))
        if info["age"]:
            a = info["age"]
            console.print(f"age (years): {a['min']:g} to {a['max']:g}, median {a['median']:g}; known for "
                          f"{a['known']} of {info['n_cases']} cases", highlight=False, soft_wrap=True)
    if info["quarantine"]["total"]:
        console.print(_quarantine_table(info))
    for message in info["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if not manifest.labelled:
        console.print(f"no labels: this is an inventory, not split and not ready to train on. "
                      f"{escape(UNLABELLED_HINT)}", highlight=False, soft_wrap=True)


def _inventory_line(info: dict[str, Any]) -> str:
    series = f", {info['n_series']} of them series of several files" if info["n_series"] else ""
    studies = f", {info['n_studies']} studies" if info.get("n_studies") is not None else ""
    return (f"[bold]{info['n_cases']} cases[/] ({info['n_files']} files{series}) from {info['n_patients']} "
            f"patients{studies}; no labels (inventory)")


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


def _counts_table(title: str, columns: dict[str, dict[str, int]]) -> Table:
    """column / value / cases, most frequent values first, the rest of a long list folded into "(other)"."""
    table = Table(title=title)
    table.add_column("column")
    table.add_column("value")
    table.add_column("cases", justify="right")
    for col, counts in columns.items():
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(items) > _MAX_VALUES:
            rest = sum(n for _, n in items[_MAX_VALUES - 1:])
            items = [*items[: _MAX_VALUES - 1], ("(other)", rest)]
        for i, (value, n) in enumerate(items):
            table.add_row(col if i == 0 else "", escape(str(value)), str(n), end_section=i == len(items) - 1)
    return table


def _inventory_table(columns: dict[str, dict[str, int]]) -> Table:
    """One row per column, its values inline with their case counts, most frequent first (compact for wide data).

    Columns that no file recorded (every value ``unknown``: NIfTI has no sex or modality) share one last row.
    """
    table = Table(title="what was found (cases per value)")
    table.add_column("column", no_wrap=True)
    table.add_column("values")
    absent = [col for col, counts in columns.items() if set(counts) == {"unknown"}]
    for col, counts in columns.items():
        if col in absent:
            continue
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(items) > _MAX_VALUES:
            rest = sum(n for _, n in items[_MAX_VALUES - 1:])
            items = [*items[: _MAX_VALUES - 1], (f"{len(counts) - _MAX_VALUES + 1} other values", rest)]
        table.add_row(col, escape(", ".join(f"{value} ({n})" for value, n in items)))
    if absent:
        table.add_row("not recorded", ", ".join(absent))
    return table


def _quarantine_table(info: dict[str, Any]) -> Table:
    """problem / files / the most frequent reason ("and other reasons" when the files' reasons differ)."""
    q = info["quarantine"]
    table = Table(title=f"quarantined: {q['total']}", caption="see quarantine.csv for each file")
    table.add_column("problem", no_wrap=True)
    table.add_column("files", justify="right")
    table.add_column("why (most frequent reason)")
    for problem, n in sorted(q["by_problem"].items(), key=lambda kv: (-kv[1], kv[0])):
        reasons = q.get("reasons", {}).get(problem, [])
        first = reasons[0] if reasons else ""
        first = first if len(first) <= _REASON_CHARS else first[: _REASON_CHARS - 3].rstrip() + "..."
        more = " (and other reasons)" if len(reasons) > 1 else ""
        table.add_row(escape(str(problem)), str(n), escape(first + more))
    return table
