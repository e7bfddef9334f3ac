"""``explain_run``: saliency overlays and their scores for selected cases of a trained run.

Writes, atomically, below ``<run_dir>/saliency/``:

- ``<method>/<case_id>_<class>.png``: the overlay (no PHI: pseudonymous case_id only); for a volume run a
  montage of the axial, coronal and sagittal slices through the saliency peak, plus the slice-attention curve
  for ``slices`` models (see :mod:`medtransfer.explain.overlay`);
- ``<method>/<case_id>_<class>.npz`` (volume runs only): the whole map, since the PNG shows three planes of
  it. A compressed NumPy archive (``np.load``, no pickle) with ``saliency`` float16 (D, H, W) in [0, 1] (the
  overlay's map), ``raw`` float32 (D, H, W) (signed, unscaled), ``peak`` int (3,) (the voxel the montage goes
  through), ``attention`` float32 (S,) (``slices`` models only), ``orientation`` (the card's axcode) and
  ``layout`` (``"DHW"``). The map lies on the model's input grid (after reorientation, resampling and
  crop/pad/resize to ``input.size``), not on the original scan's voxels: that grid has no affine of its own
  in the run, so the map is not written as NIfTI, which a viewer would place over the scan with a wrong
  geometry;
- ``index.csv``: one row per (case, class, method): case_id, class, kind (TP/FP/FN, or TN/"" for cases
  asked for by id), group, method, score (the model's probability), sanity_score, sanity_passed,
  deletion_ratio, outside_body_mass, border_mass, corner_mass, corner, hint, file (the PNG, relative to
  ``saliency/``), map_file (the ``.npz``, relative to ``saliency/``; empty for 2D runs);
- ``sanity_<method>.csv``: the cascading-randomisation table, computed once per method and run.

Work is cached: a (case, class, method) whose row is in ``index.csv`` and whose PNG exists is not redone,
so re-running with more cases or another method only computes what is missing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtransfer import distributed, io
from medtransfer.errors import ConfigError, ManifestError, RunDirError
from medtransfer.explain.faithfulness import deletion_scores
from medtransfer.explain.overlay import save_overlay
from medtransfer.explain.regions import region_hint
from medtransfer.explain.saliency import METHODS, explain
from medtransfer.explain.sanity import sanity_check
from medtransfer.explain.selection import case_kind, select_cases
from medtransfer.run_dir import load_run

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ["case_id", "class", "kind", "group", "method", "score", "sanity_score", "sanity_passed",
                 "deletion_ratio", "outside_body_mass", "border_mass", "corner_mass", "corner", "hint", "file",
                 "map_file"]
#: Images used for the sanity check (once per method per run).
SANITY_IMAGES = 4
#: Cases explained per batch.
CHUNK = 8
#: Deletion curve settings for volumes: 10 steps and 2 random orders, (1 + 2) x 11 = 33 forward passes per map
#: instead of 4 x 17 = 68 for images. A volume forward costs D slice encodes for a 2.5D model: with the image
#: settings the deletion curves took 89 of the 105 s of the volume demo's explain step (400 studies, 32 x 128 x
#: 128, 6 maps). The deletion ratio is a coarse check (< 1 or not), which 11 points and 2 orders still give.
VOLUME_DELETION: dict[str, int] = {"steps": 10, "n_random": 2}


def explain_run(
    run_dir: str | Path,
    *,
    method: str = "gradcam",
    cases: int = 4,
    case_ids: Sequence[str] | None = None,
    split: str = "test",
    predictions: pd.DataFrame | str | Path | None = None,
    group_by: str | None = None,
    progress: bool = False,
) -> Path:
    """Explain selected cases of a run and write overlays + ``saliency/index.csv``.

    Args:
        run_dir: a run directory written by ``medtransfer train``.
        method: ``gradcam``, ``integrated_gradients``, ``occlusion`` or ``saliency``.
        cases: per class and kind (TP/FP/FN) [and group], how many cases to explain (``--cases N``).
        case_ids: explain exactly these cases instead (``--case-id ID``, repeatable); any split.
        split: the split to select cases from (``--split``).
        predictions: a predictions table or CSV path; default ``<run_dir>/predictions.csv``, else the
            split is predicted here (one batched pass).
        group_by: select ``cases`` per value of this subgroup column (e.g. ``"sex"``).
        progress: show a progress bar on stderr.

    Returns:
        The path of ``saliency/index.csv``.

    Raises:
        RunDirError: not a run directory, or it has no manifest.
        ManifestError / ValueError: unknown case ids, split or method.

    Examples:
        >>> explain_run("runs/cxr1", method="gradcam", cases=2)  # doctest: +SKIP
        PosixPath('runs/cxr1/saliency/index.csv')
    """
    if method not in METHODS:
        raise ConfigError(f"unknown saliency method '{method}'; expected one of {', '.join(METHODS)}")
    run = load_run(run_dir)
    if run.manifest is None:
        raise RunDirError(f"{run.path}: no manifest.csv, so the cases cannot be found")
    out = run.path / "saliency"
    preds = _predictions(run, predictions, split if case_ids is None else None)
    chosen = _choose(run, preds, case_ids, split, cases, group_by)
    index = _read_index(out / "index.csv")
    todo = _missing(chosen, index, method, out)
    logger.info("%s: %d case(s) selected, %d to explain with %s", run.path, len(chosen), len(todo), method)
    if len(todo) or not (out / "index.csv").is_file():
        if len(todo):
            rows = _explain_cases(run, todo, chosen, method, out, progress)
            index = pd.concat([index, rows], ignore_index=True) if len(index) else rows
        index = index.drop_duplicates(["case_id", "class", "method"], keep="last")
        if distributed.is_main():
            with io.atomic_path(out / "index.csv") as tmp:
                index.reindex(columns=INDEX_COLUMNS).to_csv(tmp, index=False)
        distributed.barrier()
    if chosen.empty:
        logger.warning("%s: no %s cases to explain in split '%s' (no TP/FP/FN found)", run.path, method, split)
    return out / "index.csv"


def _predictions(run: Any, predictions: Any, split: str | None) -> pd.DataFrame:
    """The given table, the evaluation's ``predictions.csv`` for ``split``, or one inference pass over ``split``.

    ``mt.evaluate`` writes the test split's predictions to ``<run_dir>/predictions.csv`` and another split's to
    ``<run_dir>/split-<name>/predictions.csv``; a file without rows of ``split`` is not used (None: all cases).
    """
    if isinstance(predictions, pd.DataFrame):
        return predictions
    if predictions is not None:
        path = Path(predictions)
        if not path.is_file():
            raise RunDirError(f"{path}: predictions file not found")
        return pd.read_csv(path, dtype={"case_id": str})
    path = run.path / "predictions.csv" if split in (None, "test") else run.path / f"split-{split}" / "predictions.csv"
    if path.is_file():
        table = pd.read_csv(path, dtype={"case_id": str})
        if split is None or "split" not in table.columns or (table["split"] == split).any():
            return table
    manifest = run.manifest if split is None else run.manifest.split(split)
    if not len(manifest):
        raise ManifestError(f"split '{split}' has no cases in {run.path / 'manifest.csv'}")
    logger.info("%s: no predictions.csv; predicting the %s split once", run.path, split or "whole")
    return run.predict(manifest)


def _choose(run: Any, preds: pd.DataFrame, case_ids: Sequence[str] | None, split: str, n: int,
            group_by: str | None) -> pd.DataFrame:
    preds = preds.assign(case_id=preds["case_id"].astype(str))
    if case_ids is None:
        if "split" in preds.columns:
            preds = preds[preds["split"] == split]
        return select_cases(preds, n=n, group_by=group_by).drop_duplicates(["case_id", "class"])
    unknown = sorted(set(map(str, case_ids)) - set(preds["case_id"]))
    if unknown:
        raise ManifestError(f"case id(s) {unknown[:5]} not found in the run's cases ({run.path / 'manifest.csv'})")
    sub = preds[preds["case_id"].isin(set(map(str, case_ids)))]
    classes = [c[2:] for c in preds.columns if c.startswith("p_") and not c.startswith("p_raw_")]
    p = sub[[f"p_{c}" for c in classes]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    if run.card.task == "multilabel":
        picks = [[c for c in classes if _positive(row, c)] or [classes[int(np.nanargmax(pi))]]
                 if np.isfinite(pi).any() else []
                 for (_, row), pi in zip(sub.iterrows(), p, strict=True)]
    else:
        picks = [[classes[int(np.nanargmax(pi))]] if np.isfinite(pi).any() else [] for pi in p]
    rows = []
    for (i, row), picked in zip(sub.iterrows(), picks, strict=True):
        for c in picked:
            kind = case_kind(sub.loc[[i]], c).iloc[0] if f"true_{c}" in sub.columns else ""
            rows.append({"case_id": row["case_id"], "class": c, "kind": kind, "group": "requested",
                         "p": float(row[f"p_{c}"])})
    return pd.DataFrame(rows, columns=["case_id", "class", "kind", "group", "p"])


def _positive(row: pd.Series, cls: str) -> bool:
    v = row.get(f"pred_{cls}", row[f"p_{cls}"] >= 0.5)
    return bool(pd.notna(v) and v == 1)


def _read_index(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=INDEX_COLUMNS)
    return pd.read_csv(path, dtype={"case_id": str, "class": str, "file": str, "map_file": str})


def _missing(chosen: pd.DataFrame, index: pd.DataFrame, method: str, out: Path) -> pd.DataFrame:
    done = {(r.case_id, r["class"]) for _, r in index[index["method"] == method].iterrows()
            if isinstance(r["file"], str) and (out / r["file"]).is_file()
            and (not isinstance(r.get("map_file"), str) or (out / r["map_file"]).is_file())}
    keep = [(r.case_id, r["class"]) not in done for _, r in chosen.iterrows()]
    return chosen[keep].reset_index(drop=True)


def _dataset(run: Any, manifest: Any) -> Any:
    from medtransfer.data.dataset import ScanDataset

    cache = run.config.data.cache_dir or run.path / "cache"
    return ScanDataset(manifest, run.card.input, train=False, cache_dir=cache)


def _output_index(card: Any, cls: str) -> int:
    return 0 if card.task == "binary" else card.classes.index(cls)


def safe_name(text: str) -> str:
    """``text`` with anything but letters, digits, ``.``, ``-`` and ``_`` replaced by ``_`` (file names)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text))


def _explain_cases(run: Any, todo: pd.DataFrame, chosen: pd.DataFrame, method: str, out: Path,
                   progress: bool) -> pd.DataFrame:
    from medtransfer.progress import progress_bar

    ds = _dataset(run, run.manifest)
    where = {cid: i for i, cid in enumerate(run.manifest.df["case_id"].astype(str))}
    # under torchrun: rank 0 runs the sanity check (and writes its table); the maps are shared out in blocks,
    # each rank writing the files of its own cases, and the index rows gathered in order
    sanity = distributed.main_first(lambda: _sanity(run, ds, where, chosen, method, out, progress))
    mine = todo.iloc[slice(*distributed.shard_bounds(len(todo)))]
    progress = progress and distributed.is_main()
    rows: list[pd.DataFrame] = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"Saliency ({method})", total=len(mine), unit="maps", info="")
        for cls, group in mine.groupby("class", sort=False):
            for start in range(0, len(group), CHUNK):
                chunk = group.iloc[start:start + CHUNK]
                idx = [where[c] for c in chunk["case_id"]]
                rows.append(_explain_chunk(run, ds, idx, chunk, str(cls), method, out, sanity))
                bar.advance(task, len(chunk))
    blocks = [b for b in distributed.gather_objects(pd.concat(rows, ignore_index=True) if rows else None)
              if b is not None]
    return pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(columns=INDEX_COLUMNS)


def _explain_chunk(run: Any, ds: Any, idx: list[int], chunk: pd.DataFrame, cls: str, method: str, out: Path,
                   sanity: tuple[float, bool]) -> pd.DataFrame:
    x = torch.stack([ds[i]["image"] for i in idx])
    img01 = np.stack([ds.cached_image(i) for i in idx])
    target = _output_index(run.card, cls)
    sm = explain(run, x, method=method, target=target)
    hints = region_hint(sm.maps, img01)
    faith = deletion_scores(run, x, sm.maps[:, 0], target, insertion=False,
                            **(VOLUME_DELETION if x.ndim == 5 else {}))
    orientation = str(getattr(run.card.input, "orientation", None) or "RAS")
    rows = []
    for j, (_, sel) in enumerate(chunk.iterrows()):
        stem = f"{method}/{safe_name(sel['case_id'])}_{safe_name(cls)}"
        rel = f"{stem}.png"
        score, ratio = float(sel["p"]), float(faith["deletion_ratio"].iloc[j])  # p as in predictions.csv
        title = (f"{sel['case_id']} · {cls} ({sel['kind'] or 'requested'}) · {method} · p={score:.2f}\n"
                 f"sanity {sanity[0]:.2f} ({'passed' if sanity[1] else 'NOT passed'}) · deletion ratio {ratio:.2f}")
        attention = sm.attention[j] if sm.attention is not None else None
        map_rel = ""
        if x.ndim == 5:
            map_rel = f"{stem}.npz"
            save_volume_map(out / map_rel, sm.maps[j, 0], sm.raw[j, 0], attention=attention, orientation=orientation)
        save_overlay(out / rel, img01[j], sm.maps[j, 0], title=title, attention=attention, orientation=orientation)
        h = hints.iloc[j]
        rows.append({"case_id": sel["case_id"], "class": cls, "kind": sel["kind"], "group": sel["group"],
                     "method": method, "score": score, "sanity_score": sanity[0], "sanity_passed": sanity[1],
                     "deletion_ratio": ratio, "outside_body_mass": h["outside_body_mass"],
                     "border_mass": h["border_mass"], "corner_mass": h["corner_mass"], "corner": h["corner"],
                     "hint": h["hint"], "file": rel, "map_file": map_rel})
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def save_volume_map(path: str | Path, saliency: torch.Tensor, raw: torch.Tensor, *,
                    attention: torch.Tensor | None = None, orientation: str = "RAS") -> Path:
    """Write a volume's saliency map as a compressed ``.npz`` (format in the module docstring), atomically.

    Args:
        path: the file to write (``.npz``).
        saliency: float tensor (D, H, W) in [0, 1] (``SaliencyMaps.maps[i, k]``).
        raw: float tensor (D, H, W) (``SaliencyMaps.raw[i, k]``).
        attention: a ``slices`` model's attention weight per slice (S,), or None.
        orientation: the axcode of the (D, H, W) layout (``card.input.orientation``).

    Examples:
        >>> with np.load("runs/ct1/saliency/gradcam/c1_nodule.npz") as f:  # doctest: +SKIP
        ...     f["saliency"].shape
        (32, 64, 64)
    """
    sal = saliency.detach().float().cpu().numpy()
    if sal.ndim != 3:
        raise ValueError(f"a volume map is (D, H, W), got shape {sal.shape}")
    arrays: dict[str, np.ndarray] = {
        "saliency": sal.astype(np.float16), "raw": raw.detach().float().cpu().numpy().astype(np.float32),
        "peak": np.asarray(np.unravel_index(int(np.argmax(sal)), sal.shape), dtype=np.int64),
        "orientation": np.asarray(str(orientation)), "layout": np.asarray("DHW")}
    if attention is not None:
        arrays["attention"] = attention.detach().float().cpu().numpy().reshape(-1).astype(np.float32)
    with io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return Path(path)


def _sanity(run: Any, ds: Any, where: dict[str, int], chosen: pd.DataFrame, method: str,
            out: Path, progress: bool = False) -> tuple[float, bool]:
    """(sanity_score, passed) for ``method``: read from ``sanity_<method>.csv`` or computed once and written.

    Computed on up to ``SANITY_IMAGES`` selected cases of the first selected class, for that class.
    """
    path = out / f"sanity_{method}.csv"
    if path.is_file():
        table = pd.read_csv(path)
        return float(table["sanity_score"].iloc[-1]), bool(table["passed"].iloc[-1])
    cls = str(chosen["class"].iloc[0])
    ids = chosen.loc[chosen["class"] == cls, "case_id"].drop_duplicates().head(SANITY_IMAGES)
    x = torch.stack([ds[where[c]]["image"] for c in ids])
    result = sanity_check(run, x, method=method, target=_output_index(run.card, cls), progress=progress)
    table = result.table.assign(method=method, target_class=cls, sanity_score=result.sanity_score,
                                passed=result.passed, threshold=result.threshold, status=result.status,
                                reason=result.reason, maps=result.maps)
    with io.atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return result.sanity_score, result.passed
