"""Predictions: ONE batched, no-grad inference pass over cases, as the table every later stage reads.

:func:`predict_cases` scores the cases of a :class:`~medtransfer.data.manifest.Manifest` (a run's split, or
an indexed external folder) and returns the predictions table (``predictions.csv``); :func:`predict_paths`
scores new scan files or folders without labels (``medtransfer predict``). Both rebuild preprocessing from
the model card's ``InputSpec`` and apply the card's temperature and thresholds: nothing is learned here.

Predictions table columns, in order:

- ``case_id``, ``patient_key``, ``split``, ``path`` (relative to the data folder; like ``manifest.csv``,
  ``predictions.csv`` is the user's working file, so it may name files);
- ``label`` (single-label tasks: the true class name) and ``true_<class>`` (1/0, NaN when unknown; one-hot
  for single-label tasks);
- ``p_<class>``: calibrated probability (temperature from the card; binary: the positive class only),
  ``p_raw_<class>``: the same before temperature scaling;
- ``pred_<class>``: 1/0 at the card's operating point (``card.thresholds``; 0.5 where the card has none);
  ``predicted``: binary → the class name at the threshold, multi-class → the arg-max class, multi-label →
  the ``;``-joined classes at or above their thresholds;
- subgroup columns carried from the manifest (``sex``, ``age``, ``age_band``, ``site``, ``manufacturer``,
  ``view``, ``modality``), and ``error`` (empty, or why the case could not be decoded; such rows have no
  scores and are left out of metrics).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtransfer import io
from medtransfer.data.dataset import ScanDataset, make_loader
from medtransfer.data.manifest import SUBGROUP_COLUMNS, Manifest
from medtransfer.data.spec import InputSpec
from medtransfer.errors import ManifestError
from medtransfer.evaluation.result import normalise_predictions
from medtransfer.models.card import ModelCard
from medtransfer.training.run import Run

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


@dataclass
class Inference:
    """What one inference pass produced, in manifest order.

    Attributes:
        logits: float (N, K) raw model outputs (zeros for failed cases).
        targets: targets as ``Manifest.targets()`` gives them.
        errors: row index → why that case could not be decoded.
    """

    logits: np.ndarray
    targets: np.ndarray
    errors: dict[int, str]

    @property
    def ok(self) -> np.ndarray:
        """Boolean (N,) mask of the cases that were decoded and scored."""
        mask = np.ones(len(self.logits), dtype=bool)
        mask[list(self.errors)] = False
        return mask


class _Tolerant(torch.utils.data.Dataset):
    """A ScanDataset whose undecodable cases come back as a blank image plus an ``error`` reason."""

    def __init__(self, ds: ScanDataset) -> None:
        self.ds = ds
        self.targets = ds.manifest.targets()
        self.dtype = torch.long if ds.manifest.task == "multiclass" else torch.float32

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        error = ""
        try:
            image = self.ds[i]["image"]
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes a row with an error, never a crash
            error = getattr(exc, "reason", None) or f"could not be decoded ({type(exc).__name__})"
            image = torch.zeros((self.ds.spec.channels, *self.ds.spec.size), dtype=torch.float32)
        label = torch.as_tensor(np.array(self.targets[i]), dtype=self.dtype)
        return {"image": image, "label": label, "case_id": str(self.ds.manifest.df.iloc[i]["case_id"]),
                "index": i, "error": error}


def infer(model: torch.nn.Module, manifest: Manifest, spec: InputSpec, *, batch_size: int = 32,
          device: str = "auto", amp: bool = True, num_workers: int = 0, cache_dir: str | Path | None = None,
          progress: bool = False) -> Inference:
    """One batched no-grad pass (AMP and channels_last on CUDA) over every case of ``manifest``.

    Args:
        model: the classifier (returned to the device it came from afterwards).
        manifest: the cases; their labels become ``targets``.
        spec: the model card's InputSpec (never the config's: the card is what the model was trained with).
        batch_size: inference batch size.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: autocast on CUDA (bfloat16 where supported); ignored on CPU.
        num_workers: data-loader worker processes for decoding.
        cache_dir: decoded-image cache (see :class:`ScanDataset`); None decodes without caching.
        progress: show a progress bar.

    Returns:
        An :class:`Inference` with logits (N, K) in manifest order.
    """
    from medtransfer.training import device as dev
    from medtransfer.training.loop import predict_batches

    target = dev.resolve_device(device)
    amp_type = dev.amp_dtype(target, amp)
    home = next(model.parameters()).device
    net = dev.prepare_model(model, target, channels_last=True)
    data = _Tolerant(ScanDataset(manifest, spec, train=False, cache_dir=cache_dir))
    loader = make_loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                         pin_memory=target.type == "cuda")
    errors: dict[int, str] = {}
    try:
        out = predict_batches(net, _tap(loader, errors, progress), task=manifest.task, device=target, amp=amp_type,
                              channels_last=True)
    finally:
        model.to(home)
    if errors:
        log.warning("%d of %d case(s) could not be decoded; they get an 'error' and no scores",
                    len(errors), len(manifest))
    logits = out["logits"].reshape(len(manifest), -1) if len(manifest) else np.zeros((0, 1), np.float32)
    return Inference(logits, manifest.targets(), errors)


def _tap(loader: Iterable[dict[str, Any]], errors: dict[int, str], progress: bool) -> Iterator[dict[str, Any]]:
    """Pass batches through, recording decode errors and advancing a progress bar."""
    from medtransfer.progress import progress_bar

    with progress_bar(progress) as bar:
        task = bar.add_task("predicting", total=len(loader), info="")  # type: ignore[arg-type]
        for batch in loader:
            for i, reason in zip(batch["index"].tolist(), batch["error"], strict=True):
                if reason:
                    errors[int(i)] = reason
            bar.advance(task)
            yield batch


def scored_classes(card: ModelCard) -> list[str]:
    """The classes that get a probability column: the positive class (binary) or every class."""
    return [card.classes[1]] if card.task == "binary" else list(card.classes)


def probabilities(logits: np.ndarray, card: ModelCard, *, calibrated: bool = True) -> np.ndarray:
    """Probabilities (N, len(scored_classes)) from logits (N, K), with the card's temperature when asked.

    Computed in float64 (sigmoid/softmax of ``logits / T``; T = 1 uncalibrated), so that calibrated and raw
    probabilities stay exactly related.
    """
    from medtransfer.evaluation.calibration import apply_temperature

    lg = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    temperature = card.temperature if calibrated and card.temperature is not None else 1.0
    p = np.asarray(apply_temperature(lg, temperature, card.task), dtype=np.float64)
    return p.reshape(len(lg), -1)


def thresholds_of(card: ModelCard) -> dict[str, float]:
    """The card's operating point per scored class; 0.5 (logged) where the card has none."""
    missing = [c for c in scored_classes(card) if c not in card.thresholds]
    if missing:
        log.warning("the model card has no threshold for %s; using %.1f. Evaluate the run to choose them on "
                    "its validation split.", missing, DEFAULT_THRESHOLD)
    return {c: float(card.thresholds.get(c, DEFAULT_THRESHOLD)) for c in scored_classes(card)}


def predictions_table(manifest: Manifest, card: ModelCard, result: Inference) -> pd.DataFrame:
    """The predictions table (module docstring) for ``manifest`` from an inference pass."""
    df = manifest.df
    out = pd.DataFrame({"case_id": df["case_id"].astype(str), "patient_key": df["patient_key"].astype(str),
                        "split": df["split"].astype(str) if "split" in df else "", "path": df["path"].astype(str)})
    out = pd.concat([out, _truth(manifest)], axis=1)
    out = pd.concat([out, _scores(card, result)], axis=1)
    for col in SUBGROUP_COLUMNS:
        if col in df:
            out[col] = df[col].to_numpy()
    out["error"] = [result.errors.get(i, "") for i in range(len(df))]
    return normalise_predictions(out)


def _truth(manifest: Manifest) -> pd.DataFrame:
    df = manifest.df
    out = pd.DataFrame(index=df.index)
    if manifest.task == "multilabel":
        for c in manifest.classes:
            out[f"true_{c}"] = pd.to_numeric(df[c], errors="coerce").astype(float)
        return out
    label = df["label"].astype("string")
    out["label"] = label.astype(object).where(label.notna(), np.nan)
    for c in manifest.classes:
        out[f"true_{c}"] = np.where(label.isna(), np.nan, (label == c).astype(float))
    return out


def _scores(card: ModelCard, result: Inference) -> pd.DataFrame:
    classes = scored_classes(card)
    ok = result.ok
    cal = probabilities(result.logits, card)
    raw = probabilities(result.logits, card, calibrated=False)
    cal[~ok], raw[~ok] = np.nan, np.nan
    thr = thresholds_of(card)
    cols: dict[str, Any] = {}
    for j, c in enumerate(classes):
        cols[f"p_{c}"] = cal[:, j]
    for j, c in enumerate(classes):
        cols[f"p_raw_{c}"] = raw[:, j]
    pred = np.zeros_like(cal, dtype=np.int64)
    for j, c in enumerate(classes):
        pred[:, j] = cal[:, j] >= thr[c]
        cols[f"pred_{c}"] = pd.array(np.where(ok, pred[:, j], 0), dtype="Int64")
        cols[f"pred_{c}"][~ok] = pd.NA
    if card.task == "binary":
        predicted = np.where(pred[:, 0] == 1, card.classes[1], card.classes[0]).astype(object)
    elif card.task == "multiclass":
        predicted = np.asarray(card.classes, dtype=object)[np.argmax(np.nan_to_num(cal, nan=-1.0), axis=1)]
    else:
        predicted = np.asarray([";".join(c for c, v in zip(classes, row, strict=True) if v) for row in pred], object)
    predicted[~ok] = ""
    cols["predicted"] = predicted
    return pd.DataFrame(cols)


def predict_cases(run: Run, manifest: Manifest, *, batch_size: int = 32, device: str = "auto",
                  cache_dir: str | Path | None = None, progress: bool = False) -> pd.DataFrame:
    """Score every case of ``manifest`` with ``run``'s model, preprocessing, temperature and thresholds.

    Args:
        run: a loaded run (:func:`~medtransfer.load_run`).
        manifest: the cases, with labels (a split of the run's manifest, or an indexed external folder
            whose classes are the card's).
        batch_size, device: inference settings (``device="auto"``: CUDA with AMP when present).
        cache_dir: decoded-image cache folder, or None.
        progress: progress bar on stderr.

    Returns:
        The predictions table (see the module docstring), one row per case in manifest order.

    Examples:
        >>> table = predict_cases(run, run.manifest.split("test"))  # doctest: +SKIP
        >>> table[["case_id", "p_pneumonia", "pred_pneumonia"]].head()  # doctest: +SKIP
    """
    result = infer(run.model, manifest, run.card.input, batch_size=batch_size, device=device,
                   amp=run.config.train.amp, num_workers=run.config.train.num_workers, cache_dir=cache_dir,
                   progress=progress)
    return predictions_table(manifest, run.card, result)


def predict_paths(run: Run | str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]], *,
                  batch_size: int = 32, device: str = "auto", out: str | os.PathLike[str] | None = None,
                  progress: bool = False) -> pd.DataFrame:
    """Score new scans (files, or folders walked for scans) that have no labels.

    Each file is one case. A file that is not a scan, or cannot be decoded, becomes a row with an ``error``
    and no scores; it never stops the others.

    Args:
        run: a loaded run or its directory.
        paths: scan files and/or folders.
        batch_size, device, progress: as for :func:`predict_cases`.
        out: when given, the table is also written there as CSV (atomically).

    Returns:
        DataFrame with ``case_id`` (pseudonymous), ``file`` (as passed, or the folder as passed joined with
        the path inside it), ``p_<class>`` (calibrated), ``predicted`` and ``error``; no PHI.

    Raises:
        ManifestError: a path does not exist, or no file was found at all.

    Examples:
        >>> predict_paths("runs/cxr1", ["new_scans/"], out="predictions.csv")  # doctest: +SKIP
    """
    from medtransfer.training.run import load_run

    run = run if isinstance(run, Run) else load_run(run)
    found = _collect(paths)
    if not found:
        raise ManifestError(f"no files found in {', '.join(str(p) for p in paths)}; pass scan files or folders "
                            "that hold them (DICOM, NIfTI, PNG, JPEG).")
    keep = ["case_id", "file", *[f"p_{c}" for c in scored_classes(run.card)], "predicted", "error"]
    good = [(shown, path, fmt) for shown, path, fmt in found if fmt is not None]
    table = pd.DataFrame(columns=keep)
    if good:
        manifest = _unlabelled_manifest(good, run.card)
        table = predict_cases(run, manifest, batch_size=batch_size, device=device, progress=progress)
        table["file"] = [shown for shown, _, _ in good]
    bad = pd.DataFrame([{"case_id": _case_id(shown), "file": shown, "predicted": "",
                         "error": "not a recognised scan (DICOM, NIfTI, PNG or JPEG)"}
                        for shown, _, fmt in found if fmt is None], columns=keep)
    table = pd.concat([table[keep], bad], ignore_index=True) if len(bad) else table[keep]
    if out is not None:
        with io.atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
    return table


def _collect(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[str, Path, str | None]]:
    """(shown name, absolute path, format or None) for every candidate file under ``paths``."""
    from medtransfer.data.discovery import IMAGE_SUFFIXES, SKIP_SUFFIXES, scan_suffix
    from medtransfer.data.loading import sniff_format

    found: list[tuple[str, Path, str | None]] = []
    for given in paths:
        p = Path(given).expanduser()
        if p.is_file():
            found.append((str(given), p.resolve(), sniff_format(p)))
            continue
        if not p.is_dir():
            raise ManifestError(f"{given}: not found. Pass existing scan files or folders.")
        for folder, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or name.upper() == "DICOMDIR" or scan_suffix(name) in SKIP_SUFFIXES:
                    continue
                f = Path(folder) / name
                fmt = sniff_format(f)
                if fmt is None and scan_suffix(name) not in IMAGE_SUFFIXES:
                    continue  # an unknown file without an image extension is not a scan: ignored, as in indexing
                shown = (Path(str(given)) / f.relative_to(p)).as_posix()
                found.append((shown, f.resolve(), fmt))
    return found


def _case_id(shown: str) -> str:
    from medtransfer.data.privacy import pseudonym

    return "c" + pseudonym(shown, kind="case", length=10)


def _unlabelled_manifest(cases: list[tuple[str, Path, str | None]], card: ModelCard) -> Manifest:
    """A Manifest for unlabelled files; labels are placeholders that are never used.

    The files are resolved absolute paths (the user named them); they are stored relative to the filesystem
    root, which is the manifest's data folder, because manifests refuse absolute paths (a manifest naming
    ``/etc/passwd`` was edited by someone, not written by medtransfer).
    """
    anchor = Path(cases[0][1].anchor) if cases else Path("/")
    rows = [{"case_id": _case_id(shown), "patient_key": "", "path": path.relative_to(path.anchor).as_posix(),
             "files": "", "format": fmt, "split": "new"} for shown, path, fmt in cases]
    df = pd.DataFrame(rows, columns=["case_id", "patient_key", "path", "files", "format", "split"])
    if card.task == "multilabel":
        for c in card.classes:
            df[c] = np.nan
    else:
        df["label"] = card.classes[0]
    return Manifest(df, list(card.classes), card.task, anchor)


def predict(run: Run | str | os.PathLike[str],
            data: Manifest | str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
            batch_size: int = 32, device: str = "auto", out: str | os.PathLike[str] | None = None,
            progress: bool = False) -> pd.DataFrame:
    """Score cases with a trained run: labelled cases of a Manifest, or new scan files and folders.

    Args:
        run: a loaded run or its directory.
        data: a :class:`Manifest` (→ :func:`predict_cases`, the full predictions table) or one or more scan
            files/folders (→ :func:`predict_paths`: case_id, file, calibrated probabilities, predicted, error).
        batch_size, device, progress: inference settings.
        out: also write the table there as CSV (atomically).

    Returns:
        The predictions table.

    Examples:
        >>> import medtransfer as mt
        >>> mt.predict("runs/cxr1", "new_scans/", out="predictions.csv")  # doctest: +SKIP
    """
    from medtransfer.training.run import load_run

    if not isinstance(data, Manifest):
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        return predict_paths(run, paths, batch_size=batch_size, device=device, out=out, progress=progress)
    loaded = run if isinstance(run, Run) else load_run(run)
    table = predict_cases(loaded, data, batch_size=batch_size, device=device, progress=progress)
    if out is not None:
        with io.atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
    return table
