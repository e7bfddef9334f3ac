"""Patient-level, label-stratified train/val/test split.

Every case of a patient lands in the same split, so a model is never tested on a patient it was trained on.
Within that constraint the split is stratified: each patient gets one *stratum* (single-label: the patient's
most frequent class, ties going to the globally rarer class; multi-label: the rarest class the patient is
positive for, or "none"), and the patients of each stratum are shuffled with the seed and dealt out greedily
to the split that is furthest below its target share of *cases*. Before that, when a stratum has enough
patients, each split with a non-zero fraction is given one patient first (train, then test, then val), so tiny
datasets still get every class in every split. The result depends only on the seed, the fractions, and the
files' relative paths (not on the pseudonymisation salt), so a folder splits the same way on every machine.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from medtransfer.data.manifest import SPLITS, Task
from medtransfer.data.privacy import pseudonym
from medtransfer.errors import ManifestError

logger = logging.getLogger(__name__)

_SEED_ORDER = ("train", "test", "val")  # with 2 patients of a class, testing on one beats validating on one


def assign_splits(df: pd.DataFrame, classes: list[str], task: Task, *, val_fraction: float, test_fraction: float,
                  seed: int) -> pd.Series:
    """Assign every case to ``train``/``val``/``test`` by patient, stratified by label.

    Args:
        df: cases with ``patient_key`` and the label column(s) (``label``, or one 0/1/NaN column per class).
        classes: class names (multi-label: the label columns).
        task: ``binary``, ``multiclass`` or ``multilabel``.
        val_fraction, test_fraction: target shares of cases; train gets the rest.
        seed: shuffling seed; the same seed gives the same split.

    Returns:
        A string Series aligned with ``df``.

    Raises:
        ManifestError: the fractions leave nothing for training.

    Examples:
        >>> df = pd.DataFrame({"patient_key": list("abcdef"), "label": ["x", "y"] * 3})
        >>> sorted(assign_splits(df, ["x", "y"], "binary", val_fraction=0.3, test_fraction=0.3, seed=0).unique())
        ['test', 'train', 'val']
    """
    if val_fraction + test_fraction >= 1:
        raise ManifestError(f"val_fraction ({val_fraction}) + test_fraction ({test_fraction}) must be below 1 so "
                            "that some patients are left for training; lower them (e.g. --set data.val_fraction=0.15).")
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    strata = patient_strata(df, classes, task)
    sizes = df.groupby("patient_key").size()
    rng = np.random.default_rng(seed)
    # Patients are ordered by their first file's relative path (when known) before the seeded shuffle, not by
    # their pseudonymous key: keys depend on the machine's secret salt, and the same folder and seed must give
    # the same split on every machine (reproducible runs, the demo).
    first_path = (df.groupby("patient_key")["path"].min().astype(str) if "path" in df
                  else pd.Series(strata.index, index=strata.index))
    assignment: dict[str, str] = {}
    for stratum in sorted(strata.unique()):
        patients = sorted(strata.index[strata == stratum], key=lambda k: (first_path.get(k, ""), k))
        order = [patients[i] for i in rng.permutation(len(patients))]
        assignment.update(_deal(order, sizes, fractions))
    return df["patient_key"].map(assignment).astype(str)


def _deal(patients: list[str], sizes: pd.Series, fractions: dict[str, float]) -> dict[str, str]:
    """Give each patient (in the given order) to the split furthest below its target share of cases."""
    active = [s for s in _SEED_ORDER if fractions[s] > 0]
    total = float(sizes.loc[patients].sum())
    counts = dict.fromkeys(SPLITS, 0.0)
    out: dict[str, str] = {}
    for i, patient in enumerate(patients):
        if i < len(active):
            split = active[i]
        else:
            split = max(active, key=lambda s: (fractions[s] * total - counts[s], -SPLITS.index(s)))
        out[patient] = split
        counts[split] += float(sizes[patient])
    return out


def patient_strata(df: pd.DataFrame, classes: list[str], task: Task) -> pd.Series:
    """One stratum per patient (see the module docstring), indexed by ``patient_key``."""
    if task == "multilabel":
        positives = df[classes].apply(pd.to_numeric, errors="coerce").fillna(0).gt(0)
        rarity = positives.sum().sort_values(kind="stable")  # rarest class first
        per_patient = positives.groupby(df["patient_key"]).any()
        ranked = [c for c in rarity.index]
        return per_patient.apply(lambda row: next((c for c in ranked if row[c]), "none"), axis=1)
    frequency = df["label"].value_counts()
    counts = df.groupby(["patient_key", "label"]).size().reset_index(name="n")
    counts["rarity"] = counts["label"].map(frequency)
    counts = counts.sort_values(["patient_key", "n", "rarity", "label"], ascending=[True, False, True, True])
    return counts.drop_duplicates("patient_key").set_index("patient_key")["label"].astype(str)


def split_warnings(df: pd.DataFrame, classes: list[str], task: Task, *, fractions: dict[str, float] | None = None
                   ) -> list[str]:
    """Human-readable warnings for empty splits and splits without any case (positive) of a class."""
    out: list[str] = []
    for split in SPLITS:
        part = df[df["split"] == split]
        if len(part) == 0:
            if fractions is None or fractions.get(split, 0) > 0:
                out.append(f"split '{split}' has no cases; add patients or lower the other fractions.")
            continue
        if task == "multilabel":
            positives = part[classes].apply(pd.to_numeric, errors="coerce").eq(1).sum()
            absent = [c for c in classes if positives[c] == 0]
        else:
            present = set(part["label"])
            absent = [c for c in classes if c not in present]
        if absent:
            what = "positive cases" if task == "multilabel" else "cases"
            out.append(f"split '{split}' has no {what} of class(es) {absent}; metrics for them will be undefined "
                       "there. Add patients with these labels or change the split fractions.")
    return out


def resolve_keys(cases: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Final ``patient_key`` and ``study_key`` columns, with fallbacks, and warnings about them.

    The CSV's ``patient_id``/``study_id`` (column ``csv_patient_id``/``csv_study_id``) win over the DICOM
    PatientID/StudyInstanceUID pseudonyms already in the frame. A case with no patient identity at all gets
    its study's key (a patient with two studies then counts as two patients), and last its own path's key
    (each case its own patient): the split then cannot guarantee that one person stays in one split.
    A case without a study identity is its own study. The ``csv_*`` helper columns are dropped.
    """
    df = cases.copy()
    for col, kind in (("patient_key", "patient"), ("study_key", "study")):
        csv_col = "csv_patient_id" if kind == "patient" else "csv_study_id"
        keys = df[col].fillna("").astype(str)
        if csv_col in df.columns:
            given = df[csv_col].fillna("").astype(str)
            keys = given.map(lambda v, k=kind: pseudonym(v, kind=k) if v else "").where(given != "", keys)
        df[col] = keys.to_numpy()
    df = df.drop(columns=[c for c in ("csv_patient_id", "csv_study_id") if c in df.columns])
    warnings: list[str] = []
    missing = df["patient_key"] == ""
    by_study = missing & (df["study_key"] != "")
    df.loc[by_study, "patient_key"] = df.loc[by_study, "study_key"].map(lambda k: pseudonym(k, kind="patient-study"))
    by_case = missing & ~by_study
    df.loc[by_case, "patient_key"] = df.loc[by_case, "path"].map(lambda p: pseudonym(p, kind="patient-case"))
    if missing.any():
        warnings.append(
            f"{int(missing.sum())} case(s) have no patient ID (no PatientID tag and no 'patient_id' column): "
            f"{int(by_study.sum())} use their study and {int(by_case.sum())} the case itself as the patient, so "
            "patient-level leakage between splits cannot be ruled out. Add a 'patient_id' column to the labels CSV."
        )
    if len(df) >= 20 and df["patient_key"].nunique() == 1:
        warnings.append(f"all {len(df)} cases share one patient ID; if the scans were anonymised with a constant "
                        "PatientID, add the real (pseudonymous) patient_id column to the labels CSV.")
    no_study = df["study_key"] == ""
    df.loc[no_study, "study_key"] = df.loc[no_study, "path"].map(lambda p: pseudonym(p, kind="study-case"))
    return df, warnings
