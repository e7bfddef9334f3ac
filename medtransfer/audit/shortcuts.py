"""Is the model learning the hospital? ``audit_shortcuts(run)``: four checks, each from data.

(a) **Site probe**: a logistic regression predicts site / manufacturer / view from the trained model's pooled
    features (patient-grouped cross-validation, balanced accuracy against chance). High accuracy means the
    features encode the hospital, which a classifier can exploit when prevalence differs by site (Zech 2018).
(b) **Leave-one-site-out**: for each site, a linear probe on the *pretrained* backbone's features trained
    without that site (train+val cases of the other sites) is scored on the site's test cases, next to the
    same probe trained on every site. A drop means the task does not transfer across hospitals.
(c) **Prevalence vs predicted positive rate by site** on the test split, from the run's own predictions.
(d) **Saliency by site**: mean border/corner mass and the share of maps with a shortcut hint, per site and
    method, from ``saliency/index.csv`` when ``medtransfer explain`` has run.

Results go to ``<run>/audit/shortcuts.json``; the report shows them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer import io

logger = logging.getLogger(__name__)

PROBE_FLAG = 0.8  # balanced accuracy at or above which the features "see" the attribute
PROBE_MARGIN = 0.2  # ... and at least this far above chance
LOSO_FLAG = 0.05  # AUROC drop when the site is left out
MIN_PER_CLASS = 5


@dataclass
class ShortcutAudit:
    """Results of :func:`audit_shortcuts` (DataFrames, plus ``warnings``)."""

    probe: pd.DataFrame = field(default_factory=pd.DataFrame)
    loso: pd.DataFrame = field(default_factory=pd.DataFrame)
    prevalence: pd.DataFrame = field(default_factory=pd.DataFrame)
    saliency: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``shortcuts.json``)."""
        return {"probe": self.probe.to_dict("records"), "loso": self.loso.to_dict("records"),
                "prevalence": self.prevalence.to_dict("records"), "saliency": self.saliency.to_dict("records"),
                "warnings": self.warnings, "notes": self.notes}


def audit_shortcuts(run: Any, *, attributes: tuple[str, ...] = ("site", "manufacturer", "view"),
                    n_boot: int = 300, out: str | Path | None = None, progress: bool = False) -> ShortcutAudit:
    """Run the four shortcut / domain-shift checks on a trained run and write ``audit/shortcuts.json``.

    Args:
        run: a run directory or a loaded :class:`~medtransfer.training.run.Run`.
        attributes: manifest columns the site probe tries to predict.
        n_boot: bootstrap resamples for the leave-one-site-out CIs.
        out: where to write ``shortcuts.json`` (default ``<run>/audit``).
        progress: progress bars.

    Returns:
        :class:`ShortcutAudit`.
    """
    from medtransfer.errors import RunDirError
    from medtransfer.run_dir import Run, load_run

    run = run if isinstance(run, Run) else load_run(run)
    if run.manifest is None:
        raise RunDirError(f"{run.path}: no manifest.csv; the shortcut audit needs the run's indexed cases")
    result = ShortcutAudit()
    manifest = run.manifest
    feats = _features(run.model, manifest, run, progress)
    result.probe = _probe(feats, manifest.df, attributes)
    for r in result.probe.to_dict("records"):
        if r.get("flagged"):
            result.warnings.append(
                f"The model's features predict {r['attribute']} with balanced accuracy {r['balanced_accuracy']:.2f} "
                f"(chance {r['chance']:.2f}): the model can see the {r['attribute']}; check that performance "
                "holds across sites (leave-one-site-out) and that prevalence differences are not being learned.")
    result.loso, note = _leave_one_site_out(run, manifest, n_boot, progress)
    if note:
        result.notes.append(note)
    for r in result.loso.to_dict("records"):
        if r.get("flagged"):
            result.warnings.append(
                f"Leaving out {r['site']} drops its test AUROC from {r['auroc_all_sites']:.3f} to "
                f"{r['auroc_left_out']:.3f}: performance does not transfer to an unseen hospital like it.")
    result.prevalence = _prevalence(run, manifest)
    result.saliency = _saliency_by_site(run.path, manifest.df)
    target = Path(out) if out is not None else run.path / "audit"
    io.write_json(target / "shortcuts.json", result.to_json())
    return result


def _features(model: Any, manifest: Any, run: Any, progress: bool) -> np.ndarray:
    """The model's features of every case, through the run's feature cache split by split.

    A linear probe's training cached the train and val features of this very backbone (same key: backbone
    weights, InputSpec, cases), so only the test split is encoded here (a third of the work on the volume
    demo); any other run computes them all, as before. A case that cannot be decoded sends the whole pass
    through :func:`~medtransfer.inference.run_model`, which tolerates it.
    """
    from medtransfer.errors import ScanReadError
    from medtransfer.inference import run_model

    if "split" in manifest.df.columns and manifest.task != "unlabelled":
        try:
            return pooled_features(model, _cached_by_split(model, manifest, run, progress))
        except ScanReadError as exc:
            logger.info("feature cache skipped for the audit (%s); one tolerant pass instead", exc)
    out = run_model(model, manifest, run.card.input, output="features", cache_dir=run.cache_dir,
                    num_workers=run.config.train.num_workers, progress=progress, description="features (audit)")
    return pooled_features(model, out.outputs)


def _cached_by_split(model: Any, manifest: Any, run: Any, progress: bool) -> np.ndarray:
    """Features in manifest order, each split from (or into) the feature cache training uses."""
    import torch

    from medtransfer import device as dev
    from medtransfer.data.dataset import ScanDataset, make_loader
    from medtransfer.training.features import cached_features

    device = dev.resolve_device(run.config.train.device)
    spec, tc = run.card.input, run.config.train
    net = dev.prepare_model(model, device, channels_last=tc.channels_last)

    def loader_for(m: Any) -> Any:
        return make_loader(ScanDataset(m, spec, train=False, cache_dir=run.cache_dir), batch_size=tc.batch_size,
                           shuffle=False, num_workers=tc.num_workers)

    splits = manifest.df["split"].astype(str)
    out: np.ndarray | None = None
    for name in dict.fromkeys(splits):
        part = manifest.split(name)
        feats = cached_features(net, part, loader_for, spec=spec, cache_dir=run.cache_dir, device=device,
                                amp=dev.amp_dtype(device, tc.amp), channels_last=tc.channels_last,
                                progress=progress, description=f"features (audit, {name})").numpy()
        if out is None:
            out = np.zeros((len(manifest), *feats.shape[1:]), dtype=np.float32)
        out[(splits == name).to_numpy()] = feats
    model.to(torch.device("cpu"))
    return out if out is not None else np.zeros((0, 1), np.float32)


def pooled_features(model: Any, feats: np.ndarray) -> np.ndarray:
    """One vector per case: per-slice features (N, S, F) of a 2.5D volume model are pooled with its own
    attention weights (what its linear layer sees); pooled features (N, F) are returned as they are."""
    if feats.ndim != 3 or not hasattr(model.head, "attention"):
        return feats.reshape(len(feats), -1)
    import torch

    with torch.no_grad():
        h = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        a = model.head.attention(h.to(next(model.head.parameters()).device)).cpu()
        return torch.bmm(a.unsqueeze(1), h).squeeze(1).numpy()


def _probe(feats: np.ndarray, df: pd.DataFrame, attributes: tuple[str, ...]) -> pd.DataFrame:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for attr in attributes:
        if attr not in df.columns:
            continue
        y = df[attr].astype("string").fillna("").astype(str)
        counts = y[(y != "") & (y != "unknown")].value_counts()
        keep_classes = counts[counts >= MIN_PER_CLASS].index
        mask = y.isin(keep_classes).to_numpy()
        groups = df["patient_key"].to_numpy()[mask]
        n_groups = len(np.unique(groups))
        if len(keep_classes) < 2 or n_groups < 4:
            rows.append({"attribute": attr, "n": int(mask.sum()), "classes": len(keep_classes),
                         "balanced_accuracy": None, "chance": None, "flagged": False,
                         "status": f"insufficient: needs 2+ values with {MIN_PER_CLASS}+ cases each"})
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        pred = cross_val_predict(clf, feats[mask], y[mask].to_numpy(), groups=groups,
                                 cv=GroupKFold(n_splits=min(5, n_groups)))
        bacc = float(balanced_accuracy_score(y[mask], pred))
        chance = 1.0 / len(keep_classes)
        rows.append({"attribute": attr, "n": int(mask.sum()), "classes": len(keep_classes),
                     "balanced_accuracy": bacc, "chance": chance,
                     "flagged": bool(bacc >= PROBE_FLAG and bacc >= chance + PROBE_MARGIN), "status": "ok"})
    return pd.DataFrame(rows)


def _leave_one_site_out(run: Any, manifest: Any, n_boot: int, progress: bool) -> tuple[pd.DataFrame, str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medtransfer.errors import WeightsUnavailable
    from medtransfer.models.classifier import build_model

    df = manifest.df
    if manifest.task != "binary" or "site" not in df.columns:
        return pd.DataFrame(), "leave-one-site-out: binary tasks with a site column only"
    sites = [s for s in sorted(df["site"].dropna().astype(str).unique()) if s not in ("", "unknown")]
    if len(sites) < 2:
        return pd.DataFrame(), "leave-one-site-out: needs at least 2 sites"
    source = run.card.weights.get("weights", "imagenet") if isinstance(run.card.weights, dict) else "imagenet"
    try:
        pretrained = build_model(run.card.backbone, manifest.classes, task=manifest.task,
                                 in_channels=run.card.input.channels,
                                 weights=source if source in ("imagenet", "none") else "imagenet",
                                 volume=run.card.volume, slice_context=run.card.slice_context or 3)
    except WeightsUnavailable as exc:
        return pd.DataFrame(), f"leave-one-site-out skipped: pretrained weights unavailable ({exc})"
    feats = _features(pretrained, manifest, run, progress)
    y = manifest.targets().astype(int)
    site = df["site"].astype(str).to_numpy()
    split = df["split"].astype(str).to_numpy()
    fit_rows = np.isin(split, ["train", "val"])
    patients = df["patient_key"].to_numpy()

    def probe(train_mask: np.ndarray) -> Any:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, class_weight="balanced"))
        return clf.fit(feats[train_mask], y[train_mask])

    everywhere = probe(fit_rows)
    rows = []
    for s in sites:
        test = (split == "test") & (site == s)
        if test.sum() < 4 or len(np.unique(y[test])) < 2:
            rows.append({"site": s, "n_test": int(test.sum()), "status": "insufficient: test cases of one class"})
            continue
        left_out = probe(fit_rows & (site != s))
        yt, pt = y[test], patients[test]
        p_all = everywhere.predict_proba(feats[test])[:, 1]
        p_out = left_out.predict_proba(feats[test])[:, 1]
        a_all, a_out, diff = _loso_stats(yt, p_all, p_out, pt, n_boot)
        rows.append({"site": s, "n_test": int(test.sum()), "n_train_without": int((fit_rows & (site != s)).sum()),
                     "auroc_all_sites": a_all[0], "all_lo": a_all[1], "all_hi": a_all[2],
                     "auroc_left_out": a_out[0], "out_lo": a_out[1], "out_hi": a_out[2],
                     "drop": diff[0], "drop_lo": diff[1], "drop_hi": diff[2],
                     "flagged": bool(diff[0] >= LOSO_FLAG and np.isfinite(diff[1]) and diff[1] > 0), "status": "ok"})
    return pd.DataFrame(rows), ("linear probes on the pretrained backbone's features; 'all sites' = trained on "
                                "the train+val cases of every site, 'left out' = without this site")


def _loso_stats(y: np.ndarray, p_all: np.ndarray, p_out: np.ndarray, patients: np.ndarray, n_boot: int
                ) -> tuple[tuple[float, float, float], ...]:
    """Patient-bootstrap (point, lo, hi) of AUROC with all sites, left out, and their difference."""
    from medtransfer.stats.bootstrap import bootstrap_statistic
    from medtransfer.stats.metrics import fast_auroc

    def boot(stat: Any) -> tuple[float, float, float]:
        return bootstrap_statistic(stat, len(y), clusters=patients, n_boot=n_boot)

    return (boot(lambda i: fast_auroc(y[i], p_all[i])), boot(lambda i: fast_auroc(y[i], p_out[i])),
            boot(lambda i: fast_auroc(y[i], p_all[i]) - fast_auroc(y[i], p_out[i])))


def _prevalence(run: Any, manifest: Any) -> pd.DataFrame:
    if manifest.task != "binary" or "site" not in manifest.df.columns:
        return pd.DataFrame()
    test = manifest.split("test")
    if len(test) == 0:
        return pd.DataFrame()
    pos = run.card.classes[1]
    table = run.predict(test)
    truth = test.df[["case_id", "site"]].astype(str).assign(y=(test.df["label"] == pos).astype(int).to_numpy())
    table = table.drop(columns=["site"], errors="ignore").merge(truth, on="case_id", how="inner")
    out = (table.groupby("site")
           .agg(n=("y", "size"), prevalence=("y", "mean"), mean_probability=(f"p_{pos}", "mean"),
                predicted_positive_rate=(f"pred_{pos}", "mean"))
           .reset_index())
    return out


def _saliency_by_site(run_dir: Path, df: pd.DataFrame) -> pd.DataFrame:
    path = run_dir / "saliency" / "index.csv"
    if not path.is_file() or "site" not in df.columns:
        return pd.DataFrame()
    index = pd.read_csv(path, dtype={"case_id": str, "hint": str})
    index = index.merge(df[["case_id", "site"]].astype(str), on="case_id", how="left")
    index["hinted"] = index["hint"].fillna("").str.len() > 0
    return (index.groupby(["method", "site"])
            .agg(maps=("case_id", "size"), border_mass=("border_mass", "mean"), corner_mass=("corner_mass", "mean"),
                 hint_rate=("hinted", "mean"))
            .reset_index())
