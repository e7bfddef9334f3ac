"""``train``: index a scan folder, fine-tune, calibrate on validation, and write a run directory (DESIGN.md §4).

:func:`medtransfer.run_dir.load_run` reads it back.

A run directory holds the resolved ``config.yaml``, ``manifest.csv`` (+ ``quarantine.csv``),
``model.safetensors`` + ``model_card.json``, ``history.csv`` and ``checkpoints/{last,best}``. A lock file
keeps two training processes out of the same directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from medtransfer import distributed, io
from medtransfer.config import RunConfig, apply_overrides, dump_config, load_config, validate_config
from medtransfer.data.manifest import Manifest
from medtransfer.data.spec import InputSpec
from medtransfer.errors import ConfigError, ManifestError, MedtransferError, RunDirError
from medtransfer.models.card import ModelCard
from medtransfer.run_dir import Run, load_run
from medtransfer.training.calibrate import calibrate

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir/.lock`` (fcntl; released automatically if the process dies)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"{run_dir} is in use by another medtransfer process (lock file {run_dir / '.lock'}). "
                "Wait for it to finish, or choose another --out folder."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def train(
    data: str | Path | None,
    *,
    labels: str | Path | None = None,
    label_columns: Sequence[str] | None = None,
    config: RunConfig | str | Path | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Index ``data``, build the model, fine-tune it and write a run directory.

    Args:
        data: scan folder (ignored with ``resume``: the run's own manifest is used).
        labels, label_columns: labels CSV and multi-label columns (see ``index_scans``).
        config: a RunConfig, a YAML path, or None for the defaults; ``overrides`` apply on top.
        out: the run directory (default ``runs/<timestamp>``).
        resume: continue an interrupted run in ``out`` from ``checkpoints/last``. Without it, an interrupted
            run in ``out`` with the same resolved config is resumed too, and one with another config refused.
        progress: progress bars on stderr.
        on_epoch: called with each history row.

    Returns:
        The finished :class:`Run`.

    Under torchrun (``WORLD_SIZE`` > 1; see docs/guide-scale.md) every process calls this with the same
    arguments: rank 0 takes the lock, indexes, splits and writes the run directory; the others receive its
    config and manifest, train their share of each batch (DistributedDataParallel) and write nothing. An
    explicit ``out`` is required there (each process would pick its own timestamp).
    """
    if distributed.env_world_size() > 1 and not out:
        raise ConfigError("under torchrun give the run directory explicitly (--out RUN): every process must "
                          "write to the same one")
    run_dir = Path(out) if out else default_run_dir()
    with distributed.process_group(_group_device(config, overrides, run_dir, resume)):
        fresh = not run_dir.exists() if distributed.is_main() else False
        distributed.barrier()  # no rank creates run_dir before rank 0 has looked
        prepared = False
        main = distributed.is_main()
        try:
            with run_lock(run_dir) if main else contextlib.nullcontext():
                cfg, manifest, resume = distributed.main_first(lambda: _prepare(
                    run_dir, data, labels, label_columns, config, overrides, resume, progress))
                prepared = True
                return _fit_and_save(run_dir, cfg, manifest, resume, progress and main, on_epoch)
        except MedtransferError as exc:
            if fresh and not prepared and main:
                _discard_unstarted(run_dir, exc)
            raise


def _group_device(config: Any, overrides: Sequence[str], run_dir: Path, resume: bool) -> str:
    """The device training will use, for the process group's backend (NCCL for CUDA, gloo for the CPU)."""
    if distributed.env_world_size() <= 1:
        return "cpu"
    try:
        if isinstance(config, RunConfig):
            name = apply_overrides(config, overrides).train.device
        elif resume and (run_dir / "config.yaml").is_file():
            name = load_config(run_dir / "config.yaml").train.device
        else:
            name = load_config(config, list(overrides)).train.device
    except MedtransferError:
        name = "auto"  # a bad config is reported by rank 0's preparation, with its message
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _discard_unstarted(run_dir: Path, exc: MedtransferError) -> None:
    """A run that failed before training started (bad config, data that cannot be indexed) leaves no folder.

    The exception: a list of quarantined files explains the failure, so ``quarantine.csv`` is kept (alone)
    and the error names it.
    """
    quarantine = run_dir / "quarantine.csv"
    keep = quarantine.is_file() and len(quarantine.read_text(encoding="utf-8").strip().splitlines()) > 1
    for child in run_dir.iterdir():
        if keep and child == quarantine:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink(missing_ok=True)
    if keep:
        exc.args = (f"{exc.args[0] if exc.args else exc} (the files that could not be used are listed in "
                    f"{quarantine})", *exc.args[1:])
    else:
        run_dir.rmdir()


def default_run_dir() -> Path:
    """``runs/<timestamp>``: where a run goes when no ``out`` is given."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _prepare(run_dir: Path, data: Any, labels: Any, label_columns: Any, config: Any, overrides: Sequence[str],
             resume: bool, progress: bool) -> tuple[RunConfig, Manifest, bool]:
    """(config, manifest, resume): a new run is indexed; an interrupted one is read back from ``run_dir``."""
    from medtransfer.data.discovery import index_scans
    from medtransfer.models.checkpoint import training_state_exists

    if resume:
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "manifest.csv").is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no config.yaml/manifest.csv); start a new run")
        return load_config(run_dir / "config.yaml"), Manifest.load(run_dir), True
    if (run_dir / "model_card.json").is_file():
        raise RunDirError(f"{run_dir} already holds a finished run; choose another --out or delete it")
    if isinstance(config, RunConfig):
        cfg = apply_overrides(config, overrides)
    else:
        cfg = load_config(config, list(overrides))
    if data is None and cfg.data.data_dir is None:
        raise ManifestError("no data folder given: pass DATA or set data.data_dir in the config")
    data_dir = Path(data).expanduser() if data is not None else Path(cfg.data.data_dir).expanduser()
    lab = labels if labels is not None else cfg.data.labels
    cols = list(label_columns) if label_columns else (list(cfg.data.label_columns) if cfg.data.label_columns else None)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"data_dir": data_dir, "labels": lab}),
                                 "input": resolve_input_spec(cfg)})
    if training_state_exists(run_dir / "checkpoints" / "last"):
        # Re-running the command of a crashed or killed run resumes it rather than silently starting over;
        # another configuration in the same folder is refused rather than mixed with the checkpoint.
        saved = run_dir / "config.yaml"
        if saved.is_file() and _same_config(saved.read_text(encoding="utf-8"), cfg):
            logger.warning("%s holds an interrupted run with this configuration: resuming it from checkpoints/last "
                        "(choose another --out to start over)", run_dir)
            return _prepare(run_dir, None, None, None, None, (), True, progress)
        raise RunDirError(f"{run_dir} holds an interrupted run with another configuration; continue it with "
                          f"'medtransfer train --resume --out {run_dir}', or choose another --out to start over")
    io.write_text(run_dir / "config.yaml", dump_config(cfg))
    manifest = index_scans(data_dir, labels=lab, label_columns=cols, config=cfg.data, out_dir=run_dir,
                           spatial_dims=cfg.input.spatial_dims, progress=progress)
    cfg = _fit_input_size(run_dir, cfg, manifest)
    return cfg, manifest, False


def _fit_input_size(run_dir: Path, cfg: RunConfig, manifest: Manifest) -> RunConfig:
    """Lower input.size to fit small scans when it was not set explicitly (training.sizing); say so.

    The chosen size is written into ``config.yaml`` (with ``data.fit_input_size: false``, so the saved config
    reproduces the run as it ran), and the choice with its reason into ``input_size.json`` for the model card.
    """
    from medtransfer.models.backbones import get_backbone
    from medtransfer.training.sizing import choose_input_size

    choice = choose_input_size(cfg, manifest, fixed_input_size=get_backbone(cfg.model.backbone).fixed_input_size)
    (logger.warning if choice.changed else logger.info)(choice.reason)
    if choice.changed:
        cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"size": choice.size}),
                                     "data": cfg.data.model_copy(update={"fit_input_size": False})})
        io.write_text(run_dir / "config.yaml", dump_config(cfg))
    io.write_json(run_dir / "input_size.json", choice.as_card())  # last file of the preparation
    return cfg


def _same_config(saved_text: str, cfg: RunConfig) -> bool:
    """Whether the saved config.yaml is ``cfg``, allowing for the input size that training fitted to the data."""
    if saved_text == dump_config(cfg):
        return True
    from medtransfer.training.sizing import should_fit

    try:
        saved = validate_config(yaml.safe_load(saved_text) or {}, source="config.yaml")
    except (ConfigError, yaml.YAMLError):
        return False
    if not should_fit(cfg):
        return False
    fitted = cfg.model_copy(update={"input": cfg.input.model_copy(update={"size": saved.input.size}),
                                    "data": cfg.data.model_copy(update={"fit_input_size": saved.data.fit_input_size})})
    return saved_text == dump_config(fitted)


def resolve_input_spec(cfg: RunConfig) -> InputSpec:
    """The run's InputSpec: normalisation comes from the backbone's pretraining unless set explicitly.

    Pretrained weights carry their preprocessing (torchvision's weights API does the same): EfficientNet-Lite
    expects inputs scaled with mean = std = 0.5, torchvision's ImageNet models their ImageNet statistics.
    """
    from medtransfer.models.backbones import get_backbone

    spec = cfg.input
    backbone = get_backbone(cfg.model.backbone)
    if backbone.fixed_input_size and tuple(spec.size) != (backbone.input_size, backbone.input_size):
        # checked before indexing and training: the model would fail on its first batch otherwise
        raise ConfigError(f"{backbone.name} accepts only {backbone.input_size}x{backbone.input_size} inputs (its "
                          f"position embeddings are fixed), not input.size={list(spec.size)}. Set "
                          f"input.size=[{backbone.input_size}, {backbone.input_size}] (--image-size "
                          f"{backbone.input_size}) or choose a convolutional backbone.")
    if {"mean", "std"} & spec.model_fields_set:
        return spec
    mean, std = backbone.input_stats(spec.channels)
    return spec.model_copy(update={"mean": tuple(mean), "std": tuple(std)})


def _fit_and_save(run_dir: Path, cfg: RunConfig, manifest: Manifest, resume: bool, progress: bool,
                  on_epoch: Any) -> Run:
    from medtransfer.device import set_determinism
    from medtransfer.models.checkpoint import save_model, training_state_exists
    from medtransfer.training.fine_tune import fine_tune
    from medtransfer.training.tracking import Trackers

    # On resume the checkpoint restores every weight, so pretrained weights need not (and, offline, may not)
    # be loaded again; before the first checkpoint exists, resume starts from the pretrained weights.
    restoring = resume and training_state_exists(run_dir / "checkpoints" / "last")
    set_determinism(cfg.train.seed, cfg.train.deterministic)  # the new head's initialisation is seeded too
    model = build_run_model(cfg, manifest.classes, manifest.task, weights="none" if restoring else None)
    trackers = Trackers(cfg, run_dir)

    def epoch_done(row: dict[str, Any]) -> None:
        trackers.log_epoch(row)
        if on_epoch is not None:
            on_epoch(row)

    try:
        fit = fine_tune(model, manifest, cfg, run_dir=run_dir, resume=resume, progress=progress, on_epoch=epoch_done)
    finally:
        trackers.close()
    main = distributed.is_main()
    if main:
        with io.atomic_path(run_dir / "history.csv") as tmp:
            fit.history.to_csv(tmp, index=False)
    card = _make_card(cfg, manifest, fit, run_dir)
    card = _calibrate(model, manifest, cfg, card, run_dir, progress, fit.val_logits)  # sharded under DDP
    if main:
        save_model(model.cpu(), run_dir, card)
    distributed.barrier()  # the run directory is complete before any rank reads it back
    return load_run(run_dir)


def build_run_model(cfg: RunConfig, classes: Sequence[str], task: str, *, weights: str | None = None) -> Any:
    """The model a run config describes: a 2D classifier, or for 3D ``input.size`` the ``model.volume`` kind.

    Args:
        cfg: the run config (``model`` section, ``input.channels`` and ``input.size``).
        classes, task: what the model predicts.
        weights: override ``model.weights`` (``"none"`` when a checkpoint will restore every weight).
    """
    from medtransfer.models.classifier import build_model
    from medtransfer.pretrain.source import resolve_weights

    volume = cfg.model.volume if cfg.input.spatial_dims == 3 else None
    chosen, _ = resolve_weights(cfg.model.weights if weights is None else weights, cfg.model.backbone)
    return build_model(cfg.model.backbone, classes, task=task, in_channels=cfg.input.channels,
                       weights=chosen, dropout=cfg.model.dropout,
                       volume=volume, slice_context=cfg.model.slice_context)


def _calibrate(model: torch.nn.Module, manifest: Manifest, cfg: RunConfig, card: ModelCard, run_dir: Path,
               progress: bool, val_logits: Any = None) -> ModelCard:
    """Temperature and operating points chosen on the validation split (never on test data), into the card.

    A linear probe hands over its validation logits (head on cached features): no second pass over the images.
    """
    cache_dir = cfg.data.cache_dir or run_dir / "cache"
    return calibrate(model, manifest.split("val"), card, cfg, cache_dir=cache_dir, progress=progress,
                     logits=val_logits)


def _read_size_choice(run_dir: Path) -> dict[str, Any] | None:
    """The input-size choice written when the run was indexed (None for runs from before it was recorded)."""
    import json

    try:
        return json.loads((run_dir / "input_size.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _make_card(cfg: RunConfig, manifest: Manifest, fit: Any, run_dir: Path) -> ModelCard:
    from medtransfer.diagnostics import versions

    df = manifest.df
    counts = {s: {c: int(v) for c, v in _class_counts(manifest.split(s)).items()} for s in ("train", "val", "test")}
    ages = pd.to_numeric(df.get("age"), errors="coerce") if "age" in df else pd.Series(dtype=float)

    def uniq(col: str) -> list[str]:
        return sorted(str(v) for v in df[col].dropna().unique()) if col in df else []

    return ModelCard(
        name=cfg.report.title,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        backbone=cfg.model.backbone,
        weights=_weights_record(cfg),
        strategy=cfg.train.strategy,
        task=manifest.task,
        classes=list(manifest.classes),
        num_outputs=manifest.num_outputs,
        input=cfg.input,
        volume=cfg.model.volume if cfg.input.spatial_dims == 3 else None,
        slice_context=cfg.model.slice_context if cfg.input.spatial_dims == 3 and cfg.model.volume == "slices" else None,
        training={
            "counts": counts,
            "patients": {s: int(df.loc[df["split"] == s, "patient_key"].nunique()) for s in ("train", "val", "test")},
            "epochs_run": fit.epochs_run,
            "trained": fit.trained,
            "best_epoch": fit.best_epoch,
            "best_val_auroc": fit.best_metric,
            "stopped_early": fit.stopped_early,
            "seconds": round(fit.seconds, 1),
            "input_size": _read_size_choice(run_dir),
            "device": fit.device,
            "seed": cfg.train.seed,
        },
        data={
            "manifest_digest": manifest.digest(),
            "modalities": uniq("modality"),
            "views": uniq("view"),
            "sites": uniq("site"),
            "sexes": uniq("sex"),
            "age_range": [float(ages.min()), float(ages.max())] if ages.notna().any() else None,
        },
        versions={**versions(), "platform": platform.platform()},
    )


def _weights_record(cfg: RunConfig) -> dict[str, Any]:
    """The initial weights' fingerprint for the card; a pretraining folder adds what pretrained it."""
    from medtransfer.models.backbones import weights_fingerprint
    from medtransfer.pretrain.source import resolve_weights

    path, pretrained = resolve_weights(cfg.model.weights, cfg.model.backbone)
    record = weights_fingerprint(cfg.model.backbone, path)
    if pretrained is not None:
        record.update(weights=cfg.model.weights, source=f"self-supervised pretraining ({pretrained['method']}, "
                      f"{pretrained['images']} images, {pretrained['epochs']} epochs, from "
                      f"{pretrained['initial_weights']})", pretraining=pretrained)
    return record


def _class_counts(m: Manifest) -> dict[str, int]:
    if m.task == "multilabel":
        return {c: int(pd.to_numeric(m.df[c], errors="coerce").fillna(0).sum()) for c in m.classes}
    return {c: int((m.df["label"] == c).sum()) for c in m.classes}
