"""``medtransfer pretrain``: continue a backbone's pretraining on unlabelled scans, then use it as a weights source.

Transfer learning's second lever, after ImageNet (Azizi et al. 2021, "Big self-supervised models advance
medical image classification"): ImageNet weights -> self-supervised learning on the hospital's own unlabelled
scans -> fine-tune on the few labelled ones. :func:`pretrain` does the middle step with lightly's methods
(:mod:`.methods`) and medical-safe views (:mod:`.views`), and writes a pretraining folder that ``train --weights
FOLDER`` (or ``model.weights: FOLDER``) takes like any weights file.

The folder (``RUN_PT``):

- ``config.yaml``: the resolved config (``pretrain``, ``model``, ``input``, ``train`` sections used);
- ``manifest.csv`` / ``quarantine.csv``: the images used (pseudonymous, as every manifest);
- ``history.csv``: epoch, loss, lr, seconds, attempt;
- ``checkpoints/last``: the full state (student, heads, teacher, optimiser, schedule, RNG), written atomically
  after every epoch; an interrupted pretraining resumes from it (``--resume``, or the same command again);
- ``backbone.safetensors`` + ``pretrain.json`` (written last; :mod:`.source` reads them): the backbone's weights in
  its own architecture's key space, the first conv back in RGB form (each grey filter split evenly over R, G,
  B, so summing them, as grey fine-tuning does, gives the pretrained filter exactly), and what produced them.

Under torchrun each process takes a share of every batch (DistributedDataParallel; SimCLR gathers the other
ranks' embeddings as negatives); rank 0 alone indexes and writes.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medtransfer import device as dev
from medtransfer import distributed, faults, io
from medtransfer.config import RunConfig, apply_overrides, dump_config, load_config
from medtransfer.data.manifest import Manifest
from medtransfer.errors import ConfigError, ManifestError, RunDirError
from medtransfer.pretrain.source import PRETRAIN_FILE, WEIGHTS_FILE, resolve_weights

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "loss", "lr", "seconds", "attempt")
#: Fewest decodable images a pretraining accepts (contrastive batches need other images).
MIN_IMAGES = 8
#: Above this, decoded images are read from the disk cache each epoch instead of also being kept in memory.
MEMORY_CACHE_BYTES = 2 << 30


@dataclass
class PretrainResult:
    """A finished pretraining.

    Attributes:
        path: the folder; ``weights``: its ``backbone.safetensors`` (give ``path`` to ``train --weights``).
        method, backbone: what was pretrained; ``images``: how many images; ``epochs``: epochs run.
        history: one row per epoch (``HISTORY_COLUMNS``).
    """

    path: Path
    weights: Path
    method: str
    backbone: str
    images: int
    epochs: int
    history: pd.DataFrame


def pretrain(data: str | os.PathLike[str] | None, *, out: str | os.PathLike[str] | None = None,
             labels: str | os.PathLike[str] | None = None, config: RunConfig | str | os.PathLike[str] | None = None,
             overrides: tuple[str, ...] | list[str] = (), resume: bool = False, exclude_splits: tuple[str, ...] = ("test",),
             progress: bool = False) -> PretrainResult:
    """Self-supervised pretraining of ``model.backbone`` on the scans of ``data`` (labels not needed).

    Args:
        data: a scan folder ``index`` accepts (class sub-folders, any layout, or a folder without labels).
        out: the pretraining folder (default ``runs/pretrain-<timestamp>``).
        labels: optional CSV listing the images to use (its ``path`` column; label columns are ignored); with a
            ``split`` column, rows in ``exclude_splits`` are left out, so the patients you will test on never
            shape the features.
        config, overrides: a RunConfig, YAML or preset and ``key=value`` overrides (``pretrain.*``,
            ``model.backbone``, ``model.weights``, ``input.size``, ``train.device``...).
        resume: continue an interrupted pretraining in ``out`` (the same command again does it too).
        exclude_splits: splits of a labels CSV to leave out.
        progress: progress bars on stderr.

    Returns:
        :class:`PretrainResult`; ``train --weights RESULT.path`` fine-tunes from it.

    Raises:
        ConfigError: a 3D input or backbone (not supported yet), a too-large batch for the images.
        ManifestError: fewer than ``MIN_IMAGES`` usable images.
        RunDirError: ``out`` holds a finished pretraining, or an interrupted one with another config.

    Examples:
        >>> result = pretrain("unlabelled_cxr/", out="runs/pt", overrides=["pretrain.epochs=10"])  # doctest: +SKIP
        >>> mt.train("labelled_cxr/", out="runs/ft", overrides=[f"model.weights={result.path}"])  # doctest: +SKIP
    """
    if distributed.env_world_size() > 1 and not out:
        raise ConfigError("under torchrun give the pretraining folder explicitly (--out DIR)")
    folder = Path(out) if out else Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S")
    cfg0 = config if isinstance(config, RunConfig) else None
    device_name = (cfg0 or load_config(None if isinstance(config, RunConfig) else config, list(overrides))).train.device
    with distributed.process_group(dev.resolve_device(device_name)):
        from medtransfer.training.run import run_lock

        main = distributed.is_main()
        with run_lock(folder) if main else contextlib.nullcontext():
            cfg, manifest, resumed = distributed.main_first(
                lambda: _prepare(folder, data, labels, config, overrides, resume, exclude_splits, progress))
            return _fit(folder, cfg, manifest, resumed, progress and main)


def _prepare(folder: Path, data: Any, labels: Any, config: Any, overrides: Any, resume: bool,
             exclude: tuple[str, ...], progress: bool) -> tuple[RunConfig, Manifest, bool]:
    from medtransfer.data.discovery import index_scans
    from medtransfer.models.checkpoint import training_state_exists
    from medtransfer.training.run import resolve_input_spec

    if (folder / PRETRAIN_FILE).is_file():
        raise RunDirError(f"{folder} already holds a finished pretraining; choose another --out (or use it: "
                          f"medtransfer train DATA --weights {folder})")
    saved = folder / "config.yaml"
    interrupted = training_state_exists(folder / "checkpoints" / "last") and saved.is_file() \
        and (folder / "manifest.csv").is_file()
    if resume and not interrupted:
        raise RunDirError(f"{folder}: nothing to resume (no checkpoints/last); start a new pretraining")
    if isinstance(config, RunConfig):
        cfg = apply_overrides(config, list(overrides))
    else:
        cfg = load_config(config, list(overrides))
    if interrupted and resume:
        return load_config(saved), Manifest.load(folder), True
    if data is None and not interrupted:
        raise ManifestError("no data folder given: pass the folder of unlabelled scans")
    cfg = _resolved(cfg, data, labels)
    if cfg.input.spatial_dims != 2:
        raise ConfigError("self-supervised pretraining supports 2D images so far; for volumes pretrain the 2D "
                          "backbone on slices exported as images, or fine-tune from ImageNet weights")
    cfg = cfg.model_copy(update={"input": resolve_input_spec(cfg)})
    if interrupted:
        if saved.read_text(encoding="utf-8") == dump_config(cfg):
            logger.warning("%s holds an interrupted pretraining with this configuration: resuming it", folder)
            return load_config(saved), Manifest.load(folder), True
        raise RunDirError(f"{folder} holds an interrupted pretraining with another configuration; continue it "
                          f"with 'medtransfer pretrain --resume --out {folder}', or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    io.write_text(folder / "config.yaml", dump_config(cfg))
    manifest = index_scans(cfg.data.data_dir, config=cfg.data, out_dir=folder, spatial_dims=2,
                           require_labels=False, progress=progress)
    manifest = _select(manifest, labels, exclude, cfg, folder)
    return cfg, manifest, False


def _resolved(cfg: RunConfig, data: Any, labels: Any) -> RunConfig:
    data_dir = Path(data).expanduser() if data is not None else cfg.data.data_dir
    # the listing CSV is not a labels file: indexing must not look for labels in it
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"data_dir": data_dir, "labels": None,
                                                                      "label_columns": None})})


def _select(manifest: Manifest, labels: Any, exclude: tuple[str, ...], cfg: RunConfig, folder: Path) -> Manifest:
    """Leave out a labels CSV's excluded splits (when it has a split column) and cap at ``max_images``."""
    df = manifest.df
    if labels is not None:
        listing = _listing(Path(labels))
        if "split" in listing.columns and exclude:
            left_out = listing["split"].astype(str).isin(exclude)
            logger.info("pretraining leaves out %d listed image(s) of split(s) %s", int(left_out.sum()),
                        ", ".join(exclude))
            listing = listing[~left_out]
        wanted = set(listing["path"])
        df = df[df["path"].astype(str).isin(wanted)]
        missing = len(wanted) - len(df)
        if missing:
            logger.warning("%d image(s) listed in %s were not found (or not readable) in the data folder",
                           missing, Path(labels).name)
    cap = cfg.pretrain.max_images
    if cap is not None and len(df) > cap:
        patients = df["patient_key"].drop_duplicates().sample(frac=1.0, random_state=cfg.data.seed)
        counts = df.groupby("patient_key").size().reindex(patients)
        chosen = set(counts.index[counts.cumsum() <= cap])
        df = df[df["patient_key"].isin(chosen)]
        logger.info("pretraining on %d image(s) of %d patients (pretrain.max_images=%d)", len(df), len(chosen), cap)
    if len(df) < MIN_IMAGES:
        raise ManifestError(f"{len(df)} usable image(s) for pretraining; at least {MIN_IMAGES} are needed "
                            "(self-supervised methods compare images within a batch)")
    m = Manifest(df.reset_index(drop=True), [], "unlabelled", manifest.data_dir, list(manifest.warnings))
    m.save(folder)
    return m


def _listing(csv_path: Path) -> pd.DataFrame:
    """A CSV of images to use: a ``path`` column (relative to the data folder) and optionally ``split``."""
    import posixpath

    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: listing CSV not found")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "path" not in df.columns:
        raise ManifestError(f"{csv_path.name}: no 'path' column (found {list(df.columns)}); list the images to "
                            "pretrain on in a 'path' column relative to the data folder")
    df["path"] = [posixpath.normpath(p.strip().replace("\\", "/")) for p in df["path"]]
    return df


# -- the loop -----------------------------------------------------------------------------------------------
def _fit(folder: Path, cfg: RunConfig, manifest: Manifest, resumed: bool, progress: bool) -> PretrainResult:
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.lr_scheduler import LambdaLR

    from medtransfer.data.dataset import ScanDataset, make_loader
    from medtransfer.inference import TolerantDataset
    from medtransfer.models.checkpoint import load_training_state, save_training_state, training_state_exists
    from medtransfer.models.classifier import build_model
    from medtransfer.pretrain.methods import build_method
    from medtransfer.pretrain.views import random_views
    from medtransfer.progress import progress_bar
    from medtransfer.training.optim import WarmupCosine

    pc, tc = cfg.pretrain, cfg.train
    world = distributed.world_size()
    if pc.batch_size % world:
        raise ConfigError(f"pretrain.batch_size {pc.batch_size} does not divide over {world} processes; "
                          f"use a multiple of {world}")
    per_rank = pc.batch_size // world
    if len(manifest) < pc.batch_size:
        raise ConfigError(f"pretrain.batch_size {pc.batch_size} is larger than the {len(manifest)} images; "
                          f"set pretrain.batch_size={max(2, len(manifest) // 2)} or lower")
    device = dev.resolve_device(tc.device)
    amp = dev.amp_dtype(device, tc.amp, cpu_bf16=tc.cpu_bf16)
    dev.set_determinism(cfg.data.seed, tc.deterministic)
    weights, _ = resolve_weights(cfg.model.weights, cfg.model.backbone)
    encoder = build_model(cfg.model.backbone, ["a", "b"], in_channels=cfg.input.channels, weights=weights)
    encoder.head = nn.Identity()  # only encoder.features is used; an unused head would stall DDP's gradient sync
    method = build_method(pc.method, encoder, encoder.spec.feature_dim, pc, distributed=world > 1)
    method = dev.prepare_model(method, device, channels_last=device.type == "cuda")
    head_ids = {id(p) for p in method.head_parameters()}
    groups = [{"params": [p for p in method.encoder.parameters() if p.requires_grad], "lr": pc.lr},
              {"params": [p for p in method.parameters() if id(p) in head_ids], "lr": pc.lr * 10}]
    optimizer = torch.optim.AdamW(groups, weight_decay=pc.weight_decay)
    # decoded images stay in memory too when that costs under MEMORY_CACHE_BYTES (about 4 bytes a pixel)
    in_memory = len(manifest) * 4 * int(np.prod(cfg.input.size)) * cfg.input.channels < MEMORY_CACHE_BYTES
    dataset = TolerantDataset(ScanDataset(manifest, cfg.input, train=False, cache_dir=folder / "cache",
                                          memory_cache=in_memory))
    loader = make_loader(dataset, batch_size=per_rank, shuffle=True, num_workers=tc.num_workers, seed=cfg.data.seed,
                         drop_last=True, distributed=world > 1)
    steps = len(loader)
    total = steps * pc.epochs
    scheduler = LambdaLR(optimizer, WarmupCosine(int(round(pc.warmup_epochs * steps)), total))
    last = folder / "checkpoints" / "last"
    start, attempt, history = 0, 0, []
    if resumed and training_state_exists(last):
        state = load_training_state(last, method, optimizer, scheduler)
        start, history = int(state["epoch"]), list(state["extra"].get("history", []))
        attempt = int(state["extra"].get("attempt", 0)) + 1
        logger.info("resuming pretraining at epoch %d of %d", start + 1, pc.epochs)
    model: nn.Module = DistributedDataParallel(method) if world > 1 else method
    scaler = dev.make_scaler(device, amp)
    gen = torch.Generator().manual_seed(cfg.data.seed * 1000 + distributed.rank())
    logger.info("pretraining %s with %s on %d images: %d epochs of %d steps (batch %d, %s%s)", cfg.model.backbone,
                pc.method, len(manifest), pc.epochs, steps, pc.batch_size, device.type,
                f", {amp}" if amp else "")
    with progress_bar(progress) as bar:
        task = bar.add_task(f"pretraining ({pc.method})", total=total, completed=start * steps)
        for epoch in range(start, pc.epochs):
            gen.manual_seed(cfg.data.seed * 1000 + epoch * 7919 + distributed.rank())
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            method.train()
            t0, losses = time.perf_counter(), []
            for i, batch in enumerate(loader):
                good = ~_errored(batch)
                images = batch["image"][good]
                if len(images) < 2:
                    continue
                images = dev.to_device(images, device)
                with torch.no_grad():
                    view_a, view_b = random_views(images, pc, gen), random_views(images, pc, gen)
                if device.type == "cuda":
                    view_a = view_a.contiguous(memory_format=torch.channels_last)
                    view_b = view_b.contiguous(memory_format=torch.channels_last)
                faults.point("step")  # crash tests: a kill just before an optimiser step
                optimizer.zero_grad(set_to_none=True)
                with dev.autocast(device, amp):
                    loss = model(view_a, view_b)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                method.after_step((epoch * steps + i + 1) / total)
                losses.append(float(loss.detach()))
                bar.advance(task)
            if not losses:
                raise ManifestError("no batch of pretraining could be decoded; check the quarantine list")
            mean = float(np.mean(losses))
            if world > 1:
                mean = float(np.mean(distributed.gather_objects(mean)))
            row = {"epoch": epoch + 1, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0, "attempt": attempt}
            history.append(row)
            logger.info("pretraining epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, pc.epochs, mean, row["seconds"])
            if distributed.is_main():
                save_training_state(last, model=method, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                                    step=(epoch + 1) * steps, extra={"history": history, "attempt": attempt})
                _write_history(folder, history)
            distributed.barrier()
    if distributed.is_main():
        _export(folder, cfg, method.encoder, len(manifest), history)
    distributed.barrier()
    return PretrainResult(folder, folder / WEIGHTS_FILE, pc.method, cfg.model.backbone, len(manifest),
                          len(history), pd.DataFrame(history, columns=list(HISTORY_COLUMNS)))


def _errored(batch: dict[str, Any]) -> torch.Tensor:
    errors = batch.get("error")
    if errors is None:
        return torch.zeros(len(batch["image"]), dtype=torch.bool)
    return torch.tensor([bool(e) for e in errors])


def _write_history(folder: Path, history: list[dict[str, Any]]) -> None:
    with io.atomic_path(folder / "history.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(HISTORY_COLUMNS))
        writer.writeheader()
        writer.writerows(history)


def _export(folder: Path, cfg: RunConfig, encoder: nn.Module, n_images: int, history: list[dict[str, Any]]) -> None:
    """``backbone.safetensors`` in the architecture's own key space (first conv back to RGB), then
    ``pretrain.json`` last: its presence means the folder is complete."""
    from safetensors.torch import save_file

    from medtransfer._version import __version__
    from medtransfer.digest import sha256_file
    from medtransfer.models.classifier import get_path

    spec = encoder.spec
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.backbone.state_dict().items()}
    conv_key = f"{spec.first_conv}.weight"
    conv = get_path(encoder.backbone, spec.first_conv)
    if conv_key in state and getattr(conv, "in_channels", 3) == 1:
        state[conv_key] = (state[conv_key] / 3).repeat(1, 3, *([1] * (state[conv_key].ndim - 2))).contiguous()
    with io.atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    info = {
        "format": "medtransfer-pretrain", "version": 1, "backbone": cfg.model.backbone,
        "initial_weights": cfg.model.weights, "method": cfg.pretrain.method, "images": n_images,
        "epochs": len(history), "final_loss": history[-1]["loss"] if history else None,
        "input": cfg.input.model_dump(mode="json"), "pretrain": cfg.pretrain.model_dump(mode="json"),
        "weights_file": WEIGHTS_FILE, "sha256": sha256_file(folder / WEIGHTS_FILE, memoise=False),
        "first_conv": {"key": conv_key, "stored_as": "rgb (each grey filter split evenly over R, G, B)"},
        "medtransfer": __version__, "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    io.write_json(folder / PRETRAIN_FILE, info)
    logger.info("pretrained backbone written to %s", folder / WEIGHTS_FILE)

