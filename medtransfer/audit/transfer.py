"""Does pretraining help on *this* data? ``audit_transfer``: strategies x training fractions x seeds.

Every cell trains one strategy on a patient-level subset of the train split (nested: the 10% subset is inside
the 25% one, per seed, stratified by label) for the same epoch budget without early stopping, keeps the
best-validation weights, and is scored on the unchanged test split (AUROC with a patient-bootstrap CI).
Validation and test splits are those of the manifest, so every cell is judged on the same patients.

Strategies: ``scratch`` (random init, all layers: the baseline), and the pretrained ``linear-probe``,
``gradual`` and ``fine-tune``. **Sources**: besides the run's own pretrained weights (``model.weights``, ImageNet
by default), ``sources`` names other starting points, each trained with every pretrained strategy: a
``medtransfer pretrain`` folder (ImageNet -> self-supervised on the hospital's scans), a weights file, or another
backbone (``timm:<name>`` or a table name, with its ImageNet weights). Such cells are labelled
``<strategy>@<source>`` (``linear-probe@ssl``) and appear in the curve and the summary like any strategy, so
"ImageNet vs ImageNet -> SSL vs scratch" is read off one table at the same label fractions. From the cells the
audit derives:

- **learning curve**: mean test AUROC per strategy and fraction (seed spread and mean CI shown);
- **data-efficiency gain**: the smallest fraction at which a pretrained strategy's curve (linear in
  log-fraction between measured points) reaches scratch's mean AUROC at 100% of the data; gain = 1/fraction;
- **time-to-target**: epochs and wall seconds until validation AUROC first reaches the target (default:
  scratch's mean best validation AUROC at 100%), and the speed-up against scratch;
- **negative-transfer warning**: at 100% of the data, scratch matches (within 0.01) or beats the best
  pretrained strategy; "strong" when scratch's CI lies entirely above the pretrained estimate.

Cells are written to ``<out>/cells/<strategy>-f<fraction>-s<seed>.json`` as each finishes (atomically),
keyed by the audit's settings, so a killed audit continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer import io
from medtransfer.digest import sha256_json
from medtransfer.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)

STRATEGIES = ("scratch", "linear-probe", "gradual", "fine-tune")
PRETRAINED = ("linear-probe", "gradual", "fine-tune")
MATCH_MARGIN = 0.01  # AUROC difference treated as "matches"
#: The from-scratch baseline architecture for volume runs (a MONAI 3D network; see models/volumes.py).
NATIVE_BASELINE = "resnet10_3d"
CELL_VERSION = 2  # bumped when what a cell measures changes, so cells saved by older code are recomputed


@dataclass
class AuditResult:
    """Cells and conclusions of a transfer audit.

    Attributes:
        cells: one row per (strategy, fraction, seed): n_train_patients, n_train, epochs, best_epoch,
            val_auroc (best), test_auroc with test_lo/test_hi, seconds, epochs_to_target, seconds_to_target.
        curve: mean over seeds per (strategy, fraction): test_auroc, sd, test_lo, test_hi (means of the CIs).
        summary: target_auroc, data_efficiency (per pretrained strategy: fraction_to_match, gain),
            speedup (per pretrained strategy), negative_transfer (warning text or None), settings.
        warnings: human-readable warnings (negative transfer, cells that failed).
        histories: per cell name, the epoch history (for time-to-target plots).
    """

    cells: pd.DataFrame
    curve: pd.DataFrame
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``transfer.json``)."""
        return {"cells": self.cells.to_dict("records"), "curve": self.curve.to_dict("records"),
                "summary": self.summary, "warnings": self.warnings}

    def save(self, path: str | Path) -> Path:
        """Write ``transfer.json`` atomically; returns its path."""
        return io.write_json(Path(path), self.to_json())


def audit_transfer(
    manifest_or_data: Any,
    *,
    labels: str | Path | None = None,
    config: Any = None,
    overrides: Sequence[str] = (),
    strategies: Sequence[str] = ("scratch", "linear-probe", "gradual"),
    fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    seeds: int = 3,
    budget_epochs: int = 6,
    target_auroc: float | None = None,
    n_boot: int = 300,
    out: str | Path = "runs/audit",
    progress: bool = False,
    sources: dict[str, str] | None = None,
) -> AuditResult:
    """Train every (strategy x fraction x seed) cell under the same epoch budget and compare.

    Args:
        manifest_or_data: an indexed :class:`~medtransfer.data.manifest.Manifest` (its splits are used), or a
            scan folder (indexed into ``out`` with ``labels`` and the config's data settings).
        labels: labels CSV when ``manifest_or_data`` is a folder.
        config: RunConfig, YAML path or preset name (default ``quickstart``): backbone, input, LRs.
        overrides: ``key=value`` config overrides.
        strategies: from ``scratch``, ``linear-probe``, ``gradual``, ``fine-tune``.
        fractions: fractions of the training *patients*, each in (0, 1].
        seeds: seeds per cell (subset draw and training).
        budget_epochs: epochs every cell trains (no early stopping; best-validation weights are scored).
        target_auroc: validation AUROC for time-to-target; default: scratch's mean at 100% (or, without
            scratch, 0.95 x the best mean).
        n_boot: bootstrap resamples for the test-AUROC CI of each cell.
        out: audit folder (cells, cache, ``transfer.json``); re-running continues from finished cells.
        progress: progress bar with ETA over cells.
        sources: other starting points, ``{name: spec}`` (module docstring): a ``medtransfer pretrain`` folder,
            a weights file, or a backbone name (``timm:<name>`` or one of ``medtransfer backbones``).

    Returns:
        :class:`AuditResult` (also written to ``<out>/transfer.json``).

    Raises:
        ConfigError: unknown strategy, fraction outside (0, 1], budget < 1.
        ManifestError: no train/val/test cases.
    """
    from medtransfer.config import load_config
    from medtransfer.data.discovery import index_scans
    from medtransfer.data.manifest import Manifest
    from medtransfer.progress import progress_bar
    from medtransfer.training.run import resolve_input_spec

    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ConfigError(f"unknown strategy {bad}; choose from {', '.join(STRATEGIES)}")
    if not fractions or any(not 0 < float(f) <= 1 for f in fractions):
        raise ConfigError(f"fractions {list(fractions)} must each be in (0, 1]")
    if budget_epochs < 1 or seeds < 1:
        raise ConfigError("budget_epochs and seeds must be >= 1")
    out_dir = Path(out)
    raw = config if config is not None and not isinstance(config, (str, Path)) else load_config(
        config or "quickstart", list(overrides))
    cfg = raw.model_copy(update={"input": resolve_input_spec(raw)})
    source_cfgs = {name: source_config(raw, cfg, name, spec) for name, spec in (sources or {}).items()}
    if isinstance(manifest_or_data, Manifest):
        manifest = manifest_or_data
    else:
        manifest = index_scans(manifest_or_data, labels=labels, config=cfg.data, out_dir=out_dir, progress=progress)
    for split in ("train", "val", "test"):
        if len(manifest.split(split)) == 0:
            raise ManifestError(f"the transfer audit needs train, val and test cases; '{split}' is empty")

    fractions = sorted({float(f) for f in fractions})
    settings = {"cell_version": CELL_VERSION, "strategies": list(strategies), "fractions": fractions, "seeds": seeds,
                "budget_epochs": budget_epochs, "n_boot": n_boot, "backbone": cfg.model.backbone,
                "weights": cfg.model.weights, "input": cfg.input.key(), "manifest": manifest.digest(),
                "train": cfg.train.model_dump(mode="json"),
                "sources": {n: _source_fingerprint(c) for n, c in source_cfgs.items()}}
    key = sha256_json(settings, 16)
    cells_dir = out_dir / "cells"
    labelled = list(strategies) + [f"{s}@{n}" for n in source_cfgs for s in strategies if s != "scratch"]
    todo = [(s, f, seed) for seed in range(seeds) for f in fractions for s in labelled]
    rows, histories, warnings = [], {}, []
    with progress_bar(progress) as bar:
        task = bar.add_task("transfer audit", total=len(todo), info="")
        for strategy, frac, seed in todo:
            name = cell_name(strategy, frac, seed)
            path = cells_dir / f"{name}.json"
            cell = _read_cell(path, key)
            if cell is None:
                bar.update(task, info=name)
                try:
                    base, _, src = strategy.partition("@")
                    cell = _run_cell(manifest, source_cfgs[src] if src else cfg, base, frac, seed, budget_epochs,
                                     n_boot, out_dir)
                    cell["strategy"] = strategy
                except Exception as exc:  # one failed cell must not lose the others
                    logger.warning("audit cell %s failed: %s", name, exc)
                    warnings.append(f"cell {name} failed: {type(exc).__name__}: {exc}")
                    bar.advance(task)
                    continue
                io.write_json(path, {"key": key, **cell})
            histories[name] = cell.pop("history", [])
            cell.pop("key", None)
            rows.append(cell)
            bar.advance(task)
    cells = pd.DataFrame(rows)
    result = summarise(cells, histories, target_auroc=target_auroc)
    result.warnings = warnings + result.warnings
    result.summary["settings"] = {k: v for k, v in settings.items() if k != "train"}
    result.save(out_dir / "transfer.json")
    return result


def source_config(raw: Any, cfg: Any, name: str, spec: str) -> Any:
    """The resolved config of source ``name``: ``cfg`` with other weights, or ``raw`` with another backbone.

    Raises:
        ConfigError: a bad source name, or a spec that is neither a backbone, a weights file nor a folder.
    """
    from medtransfer.models.backbones import get_backbone
    from medtransfer.pretrain.source import resolve_weights
    from medtransfer.training.run import resolve_input_spec

    if not name or "@" in name or "/" in name or name == "scratch":
        raise ConfigError(f"source name {name!r}: use a short word such as 'ssl' or 'convnext'")
    text = str(spec)
    if text.startswith("timm:") or not (Path(text).expanduser().exists() or text in ("imagenet", "none")):
        try:
            get_backbone(text)
        except ConfigError as exc:
            raise ConfigError(f"source {name}={text}: neither an existing weights file or pretraining folder nor a "
                              f"backbone ({exc})") from exc
        other = raw.model_copy(update={"model": raw.model.model_copy(update={"backbone": text, "weights": "imagenet"})})
        return other.model_copy(update={"input": resolve_input_spec(other)})
    resolve_weights(text, cfg.model.backbone)  # a pretraining folder for another backbone fails here, with the fix
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": text})})


def _source_fingerprint(cfg: Any) -> dict[str, Any]:
    """What a source's cells depend on: backbone, weights (a file's or pretraining's sha256), input."""
    from medtransfer.digest import sha256_file
    from medtransfer.pretrain.source import resolve_weights

    path, info = resolve_weights(cfg.model.weights, cfg.model.backbone)
    digest = info["sha256"] if info else (sha256_file(Path(path)) if Path(path).is_file() else None)
    return {"backbone": cfg.model.backbone, "weights": cfg.model.weights, "sha256": digest, "input": cfg.input.key()}


def cell_name(strategy: str, fraction: float, seed: int) -> str:
    """File-safe cell name, e.g. ``gradual-f0.25-s1``."""
    return f"{strategy}-f{fraction:g}-s{seed}"


def _read_cell(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = io.read_json(path)
    except (OSError, ValueError):
        return None
    return data if data.get("key") == key else None


def subset_patients(manifest: Any, fraction: float, seed: int) -> Any:
    """Train split restricted to ``fraction`` of its patients, stratified by label, nested across fractions.

    Patients of each stratum are ordered by a seeded permutation (of their sorted keys); a fraction takes the
    first ``ceil(fraction * n)`` of each stratum (at least one), so smaller fractions are subsets of larger.
    """
    from medtransfer.data.splits import patient_strata

    train = manifest.split("train")
    if fraction >= 1.0:
        return train
    strata = patient_strata(train.df, list(train.classes), train.task)
    rng = np.random.default_rng([seed, 7])
    keep: list[str] = []
    for stratum in sorted(strata.unique()):
        patients = sorted(strata.index[strata == stratum])
        order = [patients[i] for i in rng.permutation(len(patients))]
        keep += order[: max(1, math.ceil(fraction * len(order)))]
    sub = train.df[train.df["patient_key"].isin(keep)]
    return type(train)(sub.copy(), list(train.classes), train.task, train.data_dir, list(train.warnings))


def _run_cell(manifest: Any, cfg: Any, strategy: str, fraction: float, seed: int, epochs: int, n_boot: int,
              out_dir: Path) -> dict[str, Any]:
    from medtransfer.data.manifest import Manifest
    from medtransfer.device import set_determinism
    from medtransfer.training.fine_tune import fine_tune
    from medtransfer.training.run import build_run_model

    train = subset_patients(manifest, fraction, seed)
    sub = Manifest(pd.concat([train.df, manifest.split(["val", "test"]).df]), list(manifest.classes),
                   manifest.task, manifest.data_dir, [])
    weights = "none" if strategy == "scratch" else cfg.model.weights
    if strategy == "scratch" and cfg.input.spatial_dims == 3:
        # For volumes the baseline is a native 3D network from scratch (model.volume: native), not the 2D
        # backbone's architecture without its weights: that is what a 3D practitioner would otherwise train.
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=native_model(cfg))})
    tc = {"strategy": "fine-tune" if strategy == "scratch" else strategy, "epochs": epochs, "patience": epochs,
          "seed": seed}
    if strategy in ("gradual",):
        tc["freeze_epochs"] = min(cfg.train.freeze_epochs, max(1, epochs - 1))
    cell_cfg = cfg.model_copy(update={
        "train": cfg.train.model_copy(update=tc),
        "model": cfg.model.model_copy(update={"weights": weights}),
        "data": cfg.data.model_copy(update={"cache_dir": out_dir / "cache"}),
    })
    # Frozen features are cached on disk by (model, cases, input): without this, a gradual cell would reuse
    # the features its linear-probe sibling computed and look faster to the target than it is. Each cell pays
    # its own feature extraction; decoded images stay shared (the same preprocessing for every strategy).
    shutil.rmtree(out_dir / "cache" / "features", ignore_errors=True)
    set_determinism(seed, cfg.train.deterministic)
    model = build_run_model(cell_cfg, manifest.classes, manifest.task, weights=weights)
    started = time.perf_counter()
    fit = fine_tune(model, sub, cell_cfg)
    seconds = time.perf_counter() - started
    test_auroc, lo, hi = _test_auroc(model, manifest.split("test"), cell_cfg, n_boot, seed)
    hist = fit.history.to_dict("records")
    return {"strategy": strategy, "fraction": fraction, "seed": seed,
            "n_train_patients": int(train.df["patient_key"].nunique()), "n_train": len(train),
            "epochs": int(fit.epochs_run), "best_epoch": int(fit.best_epoch), "val_auroc": float(fit.best_metric),
            "test_auroc": test_auroc, "test_lo": lo, "test_hi": hi, "seconds": seconds, "history": hist}


def native_model(cfg: Any) -> dict[str, Any]:
    """``model`` fields of the from-scratch 3D baseline for a volume run: MONAI's 3D ResNet-10, random weights."""
    from medtransfer.models.backbones import get_backbone

    spec = get_backbone(cfg.model.backbone)
    three_d = getattr(spec, "spatial_dims", 2) == 3
    return {"volume": "native", "backbone": cfg.model.backbone if three_d else NATIVE_BASELINE, "weights": "none"}


def _test_auroc(model: Any, test: Any, cfg: Any, n_boot: int, seed: int) -> tuple[float, float, float]:
    from medtransfer.inference import run_model
    from medtransfer.models.outputs import ranking_scores
    from medtransfer.stats.bootstrap import bootstrap_statistic
    from medtransfer.stats.metrics import macro_auroc

    out = run_model(model, test, cfg.input, batch_size=cfg.train.batch_size, device=cfg.train.device,
                    amp=cfg.train.amp, cpu_bf16=cfg.train.cpu_bf16, num_workers=cfg.train.num_workers, cache_dir=cfg.data.cache_dir)
    y, k = np.asarray(out.targets), len(test.classes)
    p = ranking_scores(out.outputs, test.task)

    def stat(idx: np.ndarray) -> float:
        return macro_auroc(y[idx], p[idx], test.task, k)

    point, lo, hi = bootstrap_statistic(stat, len(y), clusters=test.df["patient_key"].to_numpy(), n_boot=n_boot,
                                        seed=seed)
    return float(point), float(lo), float(hi)


def summarise(cells: pd.DataFrame, histories: dict[str, list[dict[str, Any]]], *,
              target_auroc: float | None = None) -> AuditResult:
    """Learning curve, data-efficiency gain, time-to-target and the negative-transfer warning from cells."""
    if cells.empty:
        return AuditResult(cells, pd.DataFrame(), {"target_auroc": None}, ["no audit cell finished"], histories)
    curve = (cells.groupby(["strategy", "fraction"], sort=True)
             .agg(test_auroc=("test_auroc", "mean"), sd=("test_auroc", "std"), test_lo=("test_lo", "mean"),
                  test_hi=("test_hi", "mean"), val_auroc=("val_auroc", "mean"), seconds=("seconds", "mean"),
                  seeds=("seed", "nunique"))
             .reset_index())
    full = curve[curve["fraction"] == curve["fraction"].max()].set_index("strategy")
    has_scratch = "scratch" in full.index
    if target_auroc is None:
        full_cells = cells[cells["fraction"] == cells["fraction"].max()]
        if has_scratch:
            target_auroc = float(full_cells.loc[full_cells["strategy"] == "scratch", "val_auroc"].mean())
        else:
            target_auroc = 0.95 * float(full_cells.groupby("strategy")["val_auroc"].mean().max())
    # time-to-target per cell
    ttt = []
    for r in cells.to_dict("records"):
        hist = histories.get(cell_name(r["strategy"], r["fraction"], r["seed"]), [])
        elapsed, hit = 0.0, (None, None)
        for h in hist:
            elapsed += float(h.get("seconds") or 0.0)
            if h.get("val_auroc") is not None and float(h["val_auroc"]) >= target_auroc - 1e-12:
                hit = (int(h["epoch"]), elapsed)
                break
        ttt.append(hit)
    cells = cells.assign(epochs_to_target=[t[0] for t in ttt], seconds_to_target=[t[1] for t in ttt])
    summary: dict[str, Any] = {"target_auroc": target_auroc, "data_efficiency": {}, "speedup": {},
                               "negative_transfer": None}
    warnings: list[str] = []
    top = float(curve["fraction"].max())
    if has_scratch:
        ref = float(full.loc["scratch", "test_auroc"])
        scratch_full = cells[(cells.strategy == "scratch") & (cells.fraction == top)]
        s_ttt = scratch_full["seconds_to_target"].dropna()
        for s in [s for s in curve["strategy"].unique() if s != "scratch"]:
            c = curve[curve.strategy == s].sort_values("fraction")
            frac = _fraction_to_reach(c["fraction"].to_numpy(), c["test_auroc"].to_numpy(), ref)
            summary["data_efficiency"][s] = {"scratch_auroc_at_full": ref, "fraction_to_match": frac,
                                             "gain": (1.0 / frac) if frac else None,
                                             "reached_at_smallest": bool(frac is not None and frac <= c["fraction"].min())}
            p_ttt = cells[(cells.strategy == s) & (cells.fraction == top)]["seconds_to_target"].dropna()
            summary["speedup"][s] = {"seconds_to_target": float(p_ttt.mean()) if len(p_ttt) else None,
                                     "scratch_seconds_to_target": float(s_ttt.mean()) if len(s_ttt) else None,
                                     "speedup": (float(s_ttt.mean() / p_ttt.mean())
                                                 if len(p_ttt) and len(s_ttt) and p_ttt.mean() > 0 else None)}
        s_lo_full = float(full.loc["scratch", "test_lo"])
        learned = bool(s_lo_full > 0.5) if np.isfinite(s_lo_full) else ref > 0.6
        summary["scratch_learned"] = learned
        if not learned:
            warnings.append(
                f"Training from scratch did not learn within the epoch budget (test AUROC {ref:.3f} with all "
                f"training data, CI {s_lo_full:.3f}-{float(full.loc['scratch', 'test_hi']):.3f}, includes chance): "
                "here pretraining is what makes the data learnable at this budget, and the data-efficiency gain "
                "is only a lower bound. Give the audit more epochs (--epochs) for a stronger scratch baseline.")
        pretrained = [s for s in full.index if s != "scratch"]
        if pretrained:
            best = max(pretrained, key=lambda s: float(full.loc[s, "test_auroc"]))
            p_auc = float(full.loc[best, "test_auroc"])
            s_lo = float(full.loc["scratch", "test_lo"])
            if ref >= p_auc - MATCH_MARGIN:
                strong = bool(np.isfinite(s_lo) and s_lo > p_auc)
                text = (f"Negative transfer{' (strong)' if strong else ''}: with all training data, training from "
                        f"scratch reaches test AUROC {ref:.3f} (CI {s_lo:.3f}-{float(full.loc['scratch', 'test_hi']):.3f})"
                        f", {'above' if ref > p_auc else 'matching'} the best pretrained strategy ({best}, "
                        f"{p_auc:.3f}). ImageNet pretraining does not help on this data; check the input "
                        "preprocessing, or prefer the simpler scratch model.")
                summary["negative_transfer"] = {"text": text, "strong": strong, "best_pretrained": best,
                                                "pretrained_auroc": p_auc, "scratch_auroc": ref}
                warnings.append(text)
    return AuditResult(cells, curve, summary, warnings, histories)


def _fraction_to_reach(fracs: np.ndarray, aurocs: np.ndarray, target: float) -> float | None:
    """Smallest fraction at which the curve (linear in log-fraction) reaches ``target``; None if never."""
    if len(fracs) == 0:
        return None
    if aurocs[0] >= target:
        return float(fracs[0])
    logf = np.log(fracs)
    for i in range(1, len(fracs)):
        if aurocs[i] >= target:
            t = (target - aurocs[i - 1]) / (aurocs[i] - aurocs[i - 1])
            return float(np.exp(logf[i - 1] + t * (logf[i] - logf[i - 1])))
    return None
