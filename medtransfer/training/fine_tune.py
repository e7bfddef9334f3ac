"""Fine-tuning strategies on top of one loop: linear probe, full fine-tune, gradual unfreezing.

- ``linear-probe``: backbone frozen (BatchNorm in eval mode); its features are computed once per image and
  cached, then only the head trains — many epochs in seconds on a CPU.
- ``fine-tune``: all layers train from the first epoch, optionally with layer-wise LR decay
  (``train.lr_decay`` < 1 gives earlier stages smaller LRs).
- ``gradual`` (fastai's ``fine_tune``): the head trains on cached frozen features for ``freeze_epochs``,
  then everything unfreezes with discriminative LRs (stage k below the head gets ``lr * lr_decay**k``).
  Departing from fastai, the frozen phase uses the feature cache and so sees no augmentation: on a CPU this
  makes the head phase ~free, and a head fitted on clean features is a good start for the unfrozen phase.

Every epoch is reseeded from ``(seed, epoch)``, so an epoch's outcome depends only on the model/optimiser
state at its start: a run killed mid-epoch and resumed from the last end-of-epoch checkpoint reproduces an
uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtransfer import device as dev
from medtransfer import distributed
from medtransfer.config import RunConfig
from medtransfer.data.dataset import ScanDataset, make_loader, warm_cache
from medtransfer.data.manifest import Manifest
from medtransfer.errors import ConfigError, ManifestError
from medtransfer.models import checkpoint
from medtransfer.models.outputs import ranking_scores
from medtransfer.progress import progress_bar
from medtransfer.stats.metrics import macro_auroc
from medtransfer.training.features import cached_features
from medtransfer.training.loop import Stepper, predict_batches, recompute_bn_stats, train_epoch
from medtransfer.training.losses import build_loss
from medtransfer.training.optim import build_optimizer, build_scheduler, current_lr

logger = logging.getLogger(__name__)

#: A head epoch on cached features makes at least this many optimiser steps (several shuffled passes over
#: the features): on a small dataset one pass is a handful of steps and leaves the head under-trained before
#: unfreezing, while a step on cached features costs well under a millisecond.
MIN_HEAD_STEPS = 50

#: ``attempt``: 0 for epochs of the first start, k for epochs run after the k-th resume (a crash, a kill, a
#: restart by torchrun's agent): a resumed run shows it, a run restarted from scratch would not.
HISTORY_COLUMNS = ["epoch", "phase", "lr", "train_loss", "val_loss", "val_auroc", "seconds", "attempt"]


@dataclass(frozen=True)
class Phase:
    """A span of epochs [start, end) with the backbone frozen (head only, cached features) or not."""

    name: str
    start: int
    end: int
    frozen: bool


@dataclass
class FitResult:
    """What fine-tuning produced (the model itself is updated in place and holds the best weights)."""

    history: pd.DataFrame
    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_early: bool
    device: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    trained: str = ""
    #: Validation logits (N, K) of the best weights when the backbone stayed frozen throughout (a linear probe):
    #: its head applied to the cached validation features, so calibration needs no second pass over the images.
    val_logits: np.ndarray | None = None


def trained_parts(phases_run: list[str]) -> str:
    """What the epochs actually trained, from the phases of the history rows, for the model card.

    ``"head only"`` (backbone frozen throughout: a linear probe), ``"full network"`` (every layer from the
    first epoch) or ``"head then full network"`` (gradual unfreezing that did unfreeze).
    """
    head, full = "head" in phases_run, "all" in phases_run
    if head and full:
        return "head then full network"
    return "full network" if full else "head only" if head else "nothing"


def frozen_only_warning(strategy: str, epochs: int, freeze_epochs: int) -> str | None:
    """The warning for a ``gradual`` run whose epochs all fall in the head phase, or None.

    Such a run never unfreezes the backbone: it is a linear probe, whatever the preset says. Quickstart's
    ``freeze_epochs`` is 2, so ``--epochs 2`` (a natural first try) silently fine-tunes nothing.
    """
    if strategy != "gradual" or epochs > freeze_epochs:
        return None
    return (f"train.epochs={epochs} <= train.freeze_epochs={freeze_epochs}: the backbone is never unfrozen, so this "
            f"run is a linear probe (only the new head trains). Raise --epochs (train.epochs) above {freeze_epochs} "
            f"to fine-tune the whole network, or set train.strategy=linear-probe to say a probe is what you want.")


def plan_phases(strategy: str, epochs: int, freeze_epochs: int) -> list[Phase]:
    """The phases of a strategy. ``gradual`` with ``freeze_epochs >= epochs`` is a linear probe."""
    if strategy == "linear-probe":
        return [Phase("head", 0, epochs, True)]
    if strategy == "fine-tune":
        return [Phase("all", 0, epochs, False)]
    k = min(freeze_epochs, epochs)
    phases = [Phase("head", 0, k, True)] if k else []
    if epochs > k:
        phases.append(Phase("all", k, epochs, False))
    return phases


def _advancing(batches: Iterable[Any], bar: Any, task_id: Any) -> Iterator[Any]:
    """Yield ``batches``, advancing ``task_id`` of ``bar`` by one per batch (validation, precise BN)."""
    for batch in batches:
        yield batch
        bar.advance(task_id)


def reseed(seed: int, epoch: int) -> None:
    """Seed python/numpy/torch from (seed, epoch) so that each epoch is reproducible on its own."""
    s = (seed * 1_000_003 + epoch * 7_919) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class _Trainer:
    """State of one fine-tuning job; methods are the steps of :func:`fine_tune`."""

    def __init__(self, model: Any, manifest: Manifest, cfg: RunConfig, run_dir: Path | None,
                 progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
        self.model, self.cfg, self.tc, self.spec = model, cfg, cfg.train, cfg.input
        self.run_dir, self.progress, self.on_epoch = run_dir, progress, on_epoch
        self.task, self.n_classes = manifest.task, len(manifest.classes)
        self.train_m, self.val_m = manifest.split("train"), manifest.split("val")
        if len(self.train_m) == 0 or len(self.val_m) == 0:
            raise ManifestError(
                f"fine-tuning needs cases in both train and val splits (got {len(self.train_m)} train, "
                f"{len(self.val_m)} val); add data or adjust data.val_fraction"
            )
        self.device = dev.resolve_device(self.tc.device)
        self.amp = dev.amp_dtype(self.device, self.tc.amp)
        self.channels_last = self.tc.channels_last
        self.cache_dir = cfg.data.cache_dir or (run_dir / "cache" if run_dir else None)
        self.world = distributed.world_size() if distributed.active() else 1
        self.rank_batch = _rank_batch(self.tc.batch_size, self.world, self.tc.accumulate)
        if self.tc.sync_bn and self.world > 1:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                logger.warning("train.sync_bn is ignored on the CPU (SyncBatchNorm needs CUDA)")
        self.model = dev.prepare_model(model, self.device, channels_last=self.channels_last)
        self.attempt = 0
        self.loss_fn = build_loss(self.task, self.train_m.targets(), self.n_classes,
                                  class_weights=self.tc.class_weights,
                                  label_smoothing=self.tc.label_smoothing).to(self.device)
        bn = self.tc.bn
        if bn == "auto":
            bn = "frozen" if self.tc.strategy == "gradual" and cfg.model.weights != "none" else "train"
        self.bn_frozen = bn == "frozen"
        precise = self.tc.precise_bn
        self.precise_bn = (cfg.model.weights == "none") if precise is None else precise
        self.history: list[dict[str, Any]] = []
        self.best_metric, self.best_epoch, self.bad_epochs = -np.inf, 0, 0
        self._feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- data -------------------------------------------------------------------------------------
    def _dataset(self, m: Manifest, *, train: bool) -> ScanDataset:
        return ScanDataset(m, self.spec, train=train, augment=self.tc.augment if train else None,
                           cache_dir=self.cache_dir)

    def _loader(self, ds: ScanDataset, *, shuffle: bool, epoch: int = 0) -> torch.utils.data.DataLoader:
        """Training loader (``shuffle``: this rank's share of the global batch, DistributedSampler under DDP)
        or an inference loader (in order, ``batch_size`` a pass)."""
        if not shuffle:
            return make_loader(ds, batch_size=self.tc.batch_size, shuffle=False, num_workers=self.tc.num_workers,
                               seed=self.tc.seed + epoch)
        # A last training batch of one case stops BatchNorm in training mode ("Expected more than 1 value per
        # channel"): drop it (the order is shuffled, so a different case sits out each epoch).
        per_rank = -(-len(ds) // self.world)
        drop_last = per_rank > 1 and per_rank % self.rank_batch == 1
        loader = make_loader(ds, batch_size=self.rank_batch, shuffle=True, num_workers=self.tc.num_workers,
                             seed=self.tc.seed + epoch, drop_last=drop_last, distributed=self.world > 1)
        if self.world > 1:
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        return loader

    def _val_shard(self) -> Manifest:
        """This rank's block of the validation cases (all of them in one process); gathered after inference."""
        return self.val_m.rows(*distributed.shard_bounds(len(self.val_m))) if self.world > 1 else self.val_m

    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached frozen features and targets of the train or val split."""
        if split not in self._feats:
            m = self.train_m if split == "train" else self.val_m
            f = cached_features(self.model, m, lambda part: self._loader(self._dataset(part, train=False),
                                                                        shuffle=False),
                                spec=self.spec, cache_dir=self.cache_dir,
                                device=self.device, amp=self.amp, channels_last=self.channels_last,
                                progress=self.progress, description=f"features ({split})")
            self._feats[split] = (f, torch.tensor(np.array(m.targets())))
        return self._feats[split]

    def head_passes(self) -> int:
        """Passes over the cached training features per head epoch (see MIN_HEAD_STEPS)."""
        steps = -(-len(self.train_m) // self.tc.batch_size)
        return max(1, -(-MIN_HEAD_STEPS // steps))

    def _feature_batches(self, split: str, *, shuffle: bool, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        f, y = self.features(split)
        bs = self.tc.batch_size
        if not shuffle:
            return [(f[i:i + bs], y[i:i + bs]) for i in range(0, len(f), bs)]
        g = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + epoch)
        batches = []
        for _ in range(self.head_passes()):
            order = torch.randperm(len(f), generator=g)
            batches += [(f[order[i:i + bs]], y[order[i:i + bs]]) for i in range(0, len(f), bs)]
        return batches

    # -- phases -----------------------------------------------------------------------------------
    def stepper(self, phase: Phase) -> Stepper:
        if phase.frozen:
            self.model.freeze_backbone()
            groups = [{"params": list(self.model.head.parameters()), "lr": self.tc.lr}]
            steps = -(-len(self.train_m) // self.tc.batch_size) * self.head_passes()
            net = self.model.head
        else:
            self.model.bn_frozen = self.bn_frozen
            self.model.unfreeze()
            gradual = self.tc.strategy == "gradual"
            decay = self.tc.lr_decay if (gradual or self.tc.lr_decay < 1) else 1.0
            groups = self.model.param_groups(self.tc.lr * (self.tc.unfreeze_lr_factor if gradual else 1.0), decay)
            steps = len(self._loader(self._dataset(self.train_m, train=True), shuffle=True))
            net = self.model
        opt = build_optimizer(groups, self.tc)
        sched, interval = build_scheduler(opt, self.tc, steps_per_epoch=steps, epochs=phase.end - phase.start)
        if not phase.frozen and self.world > 1:
            # every rank trains the whole network on its share of each batch; gradients are averaged
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return Stepper(net, opt, sched, interval, self.loss_fn, self.device, self.amp,
                       dev.make_scaler(self.device, self.amp), self.tc.grad_clip,
                       self.channels_last and not phase.frozen,
                       accumulate=1 if phase.frozen else self.tc.accumulate)

    def run_epoch(self, phase: Phase, st: Stepper, epoch: int) -> dict[str, Any]:
        """Train one epoch and validate; returns the history row."""
        reseed(self.tc.seed, epoch)
        t0 = time.perf_counter()
        if phase.frozen:
            batches: Any = self._feature_batches("train", shuffle=True, epoch=epoch)
            val_batches: Any = self._feature_batches("val", shuffle=False, epoch=epoch)
            val_net = self.model.head
        else:
            # make_loader seeds the shuffle order and the augmentation from seed + epoch
            batches = self._loader(self._dataset(self.train_m, train=True), shuffle=True, epoch=epoch)
            val_batches = self._loader(self._dataset(self._val_shard(), train=False), shuffle=False)
            val_net = self.model
        precise = not phase.frozen and self.precise_bn
        # One display per epoch, opened after the feature cache (which has its own) and closed before
        # on_epoch prints the epoch's line: nothing is drawn over that line and no bar is reprinted. Its
        # total counts every pass of the epoch (train, precise-BN, validation), so it ends when the epoch does.
        # transient when on_epoch reports the epoch (the CLI prints a line), else the finished row stays.
        with progress_bar(self.progress, transient=self.on_epoch is not None) as bar:
            task_id = bar.add_task(f"epoch {epoch + 1}/{self.tc.epochs} [{phase.name}]", unit="batches", info="",
                                   total=len(batches) * (2 if precise else 1) + len(val_batches))
            lr = current_lr(st.optimizer)
            train_loss = train_epoch(st, batches, on_batch=lambda loss: bar.update(
                task_id, advance=1, info=f"loss {loss:.3f}"))
            if precise:
                self.model.train()
                if not recompute_bn_stats(self.model, _advancing(batches, bar, task_id), device=self.device,
                                          channels_last=st.channels_last):  # no BatchNorm: no pass was made
                    bar.update(task_id, total=len(batches) + len(val_batches))
                distributed.average_buffers(self.model)  # each rank's statistics came from its share
            pred = predict_batches(val_net, _advancing(val_batches, bar, task_id), task=self.task,
                                   device=self.device, amp=self.amp, channels_last=st.channels_last,
                                   loss_fn=self.loss_fn, gather=not phase.frozen)
            if phase.frozen:
                distributed.broadcast_module(self.model.head)  # the same head on every rank, bit for bit
            auroc = macro_auroc(pred["targets"], ranking_scores(pred["logits"], self.task), self.task, self.n_classes)
            st.end_epoch(pred.get("loss", float("nan")) if self.tc.plateau_on == "val_loss" else auroc)
            bar.update(task_id, info=f"loss {train_loss:.3f} val_auroc {auroc:.3f}")
        if not phase.frozen and self.world > 1:  # the epoch's mean training loss over every rank's share
            train_loss = float(np.mean(distributed.gather_objects(train_loss)))
        return {"epoch": epoch + 1, "phase": phase.name, "lr": lr, "train_loss": train_loss,
                "val_loss": pred.get("loss", float("nan")), "val_auroc": auroc,
                "seconds": time.perf_counter() - t0, "attempt": self.attempt}

    # -- checkpoints ------------------------------------------------------------------------------
    def _ckpt(self, name: str, *, write: bool = False) -> Path | None:
        # Under DDP only rank 0 writes checkpoints (the other ranks hold identical weights); all ranks read them.
        if not self.run_dir or (write and not distributed.is_main()):
            return None
        return self.run_dir / "checkpoints" / name

    def save_last(self, phase: Phase, st: Stepper, epoch: int) -> None:
        path = self._ckpt("last", write=True)
        if path is None:
            return
        extra = {"phase": phase.name, "history": self.history, "best_metric": float(self.best_metric),
                 "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "attempt": self.attempt}
        checkpoint.save_training_state(path, model=self.model, optimizer=st.optimizer, scheduler=st.scheduler,
                                       epoch=epoch + 1, step=0, rng={}, extra=extra)

    def save_best(self) -> None:
        path = self._ckpt("best", write=True)
        if path is not None:
            checkpoint.save_weights(self.model, path / "model.safetensors")

    def try_resume(self) -> tuple[int, dict[str, Any] | None]:
        """Load checkpoints/last when present: returns (next epoch, saved state)."""
        path = self._ckpt("last")
        if path is None or not checkpoint.training_state_exists(path):
            return 0, None
        state = checkpoint.peek_training_state(path)
        extra = state.get("extra", {})
        self.history = list(extra.get("history", []))
        self.best_metric = float(extra.get("best_metric", -np.inf))
        self.best_epoch = int(extra.get("best_epoch", 0))
        self.bad_epochs = int(extra.get("bad_epochs", 0))
        self.attempt = int(extra.get("attempt", 0)) + 1
        for row in self.history:
            row.setdefault("attempt", 0)
        logger.info("resuming after epoch %d from %s", state["epoch"], path)
        return int(state["epoch"]), state

    def warm_shared_cache(self) -> None:
        """Under DDP: fill the decoded-image cache before training, each rank a disjoint block of the cases.

        Otherwise ranks would decode the cases the DistributedSampler gives them in the first epoch, and two
        ranks could write one cache file (the sampler pads shards with duplicates; every rank would write the
        cache's spec.json). Rank 0 writes spec.json first; then every file is written by exactly one rank.
        """
        if self.world == 1 or self.cache_dir is None:
            return
        both = Manifest(pd.concat([self.train_m.df, self.val_m.df], ignore_index=True), list(self.train_m.classes),
                        self.task, self.train_m.data_dir)
        if distributed.is_main():
            self._dataset(both.rows(0, 1), train=False).write_cache_spec()
        distributed.barrier()
        warm_cache(self._dataset(both.rows(*distributed.shard_bounds(len(both))), train=False),
                   progress=self.progress and distributed.is_main())
        distributed.barrier()

    def fit(self, resume: bool) -> FitResult:
        t0 = time.perf_counter()
        self.warm_shared_cache()
        phases = plan_phases(self.tc.strategy, self.tc.epochs, self.tc.freeze_epochs)
        warning = frozen_only_warning(self.tc.strategy, self.tc.epochs, self.tc.freeze_epochs)
        if warning is not None:
            logger.warning(warning)
        start, saved = self.try_resume() if resume else (0, None)
        stopped = False
        for phase in phases:
            if phase.end <= start:
                continue
            st = self.stepper(phase)
            if saved is not None:
                same_phase = saved.get("extra", {}).get("phase") == phase.name
                checkpoint.load_training_state(self._ckpt("last"), self.model,
                                               st.optimizer if same_phase else None,
                                               st.scheduler if same_phase else None)
                saved = None
            for epoch in range(max(start, phase.start), phase.end):
                stopped = self._epoch(phase, st, epoch)
                if stopped:
                    break
            if stopped:
                break
        self._restore_best()
        trained = trained_parts([str(r["phase"]) for r in self.history])
        val_logits = None
        if trained == "head only" and "val" in self._feats:
            with torch.no_grad():
                head = self.model.head.eval()
                feats = self._feats["val"][0].to(self.device)
                val_logits = head(feats).float().cpu().numpy().reshape(len(feats), -1)
        return FitResult(pd.DataFrame(self.history, columns=HISTORY_COLUMNS), self.best_epoch,
                         float(self.best_metric), len(self.history), stopped,
                         dev.describe(self.device, self.amp), time.perf_counter() - t0,
                         trained=trained, val_logits=val_logits)

    def _epoch(self, phase: Phase, st: Stepper, epoch: int) -> bool:
        row = self.run_epoch(phase, st, epoch)
        self.history.append(row)
        metric = row["val_auroc"] if np.isfinite(row["val_auroc"]) else -row["val_loss"]
        if metric > self.best_metric:
            self.best_metric, self.best_epoch, self.bad_epochs = metric, row["epoch"], 0
            self.save_best()
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_epochs += 1
        self.save_last(phase, st, epoch)
        logger.info("epoch %d: train_loss %.4f val_loss %.4f val_auroc %.4f", row["epoch"], row["train_loss"],
                 row["val_loss"], row["val_auroc"])
        if self.on_epoch is not None and distributed.is_main():
            self.on_epoch(row)
        last_phase = phase.end == self.tc.epochs
        return last_phase and self.bad_epochs >= self.tc.patience

    def _restore_best(self) -> None:
        state = getattr(self, "_best_state", None)
        if state is not None:
            self.model.load_state_dict(state)
        elif self._ckpt("best") is not None and (self._ckpt("best") / "model.safetensors").is_file():
            checkpoint.load_weights(self.model, self._ckpt("best") / "model.safetensors")
        self.model.unfreeze()
        self.model.eval()


def _rank_batch(batch_size: int, world: int, accumulate: int) -> int:
    """Each rank's share of the global batch (``train.batch_size`` / number of processes), checked."""
    if batch_size % world:
        lower, upper = batch_size // world * world, -(-batch_size // world) * world
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must split evenly over {world} "
                          f"processes; use {lower or world} or {upper}.")
    per_rank = batch_size // world
    if accumulate > per_rank:
        raise ConfigError(f"train.accumulate={accumulate} is more micro-batches than the {per_rank} images each "
                          f"process gets per step (batch_size {batch_size} / {world} processes); lower it.")
    return per_rank


def fine_tune(
    model: Any,
    manifest: Manifest,
    cfg: RunConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Fine-tune ``model`` on the train split of ``manifest``, early-stopping on validation AUROC.

    Args:
        model: a :class:`~medtransfer.models.classifier.Classifier` from :func:`~medtransfer.build_model`.
        manifest: an indexed manifest with train and val splits.
        cfg: the run config (``train`` section: strategy, epochs, LRs...; ``input``: preprocessing).
        run_dir: where ``checkpoints/last`` (resumable) and ``checkpoints/best`` are written; None keeps
            everything in memory.
        resume: continue from ``run_dir/checkpoints/last`` when it exists.
        progress: show progress on stderr for each feature pass and epoch: bars on a terminal, a line at least
            every 30 s in a log (see :mod:`medtransfer.progress`).
        on_epoch: called with each history row (epoch, phase, lr, train_loss, val_loss, val_auroc, seconds).

    Returns:
        A :class:`FitResult`; ``model`` holds the best-validation weights, in eval mode.

    Examples:
        >>> model = build_model("efficientnet_lite0", manifest.classes, task=manifest.task)  # doctest: +SKIP
        >>> result = fine_tune(model, manifest, load_config("configs/quickstart.yaml"))  # doctest: +SKIP
    """
    dev.set_determinism(cfg.train.seed, cfg.train.deterministic)
    trainer = _Trainer(model, manifest, cfg, Path(run_dir) if run_dir else None, progress, on_epoch)
    return trainer.fit(resume)
