"""``train --dry-run``: what a training job will cost, measured on this machine before anyone waits for it.

The estimate runs the real code paths on a few cases: it indexes the folder (headers only: no pixel
verification), fits the input size as training would, builds the model with its weights, then times

- decoding and resizing a sample of scans (the first epoch decodes every scan once; later ones read the cache),
- two batches through the frozen backbone (feature extraction, validation, calibration run at this rate),
- two optimiser steps of the full network at the configured batch size, augmentation included (after one
  warm-up step, as the first step of a run includes one-off kernel selection).

From those rates and the split sizes it states the seconds of each stage and of the whole run at its maximum
epochs (early stopping may end it sooner). Nothing is written: no run directory, no cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medtransfer.config import RunConfig, apply_overrides, load_config
from medtransfer.cpu import configure_torch
from medtransfer.data.manifest import Manifest
from medtransfer.progress import format_duration

logger = logging.getLogger(__name__)

#: Scans decoded to time decoding.
DECODE_SAMPLE = 16
#: Timed batches for inference and for training (after one warm-up batch each).
TIMED_BATCHES = 2


@dataclass
class Estimate:
    """A training job's cost, from rates measured on this machine.

    Attributes:
        counts: cases per split.
        size, size_reason: the input size training will use, and why.
        strategy: the fine-tuning strategy; ``epochs``/``freeze_epochs`` its epoch budget.
        decode_per_s, infer_per_s, train_per_s: measured images per second.
        stages: (stage, seconds) in the order they run; ``total_s`` their sum.
        device, threads: where it was measured.
    """

    counts: dict[str, int]
    size: tuple[int, ...]
    size_reason: str
    strategy: str
    epochs: int
    freeze_epochs: int
    batch_size: int
    decode_per_s: float
    infer_per_s: float
    train_per_s: float | None
    stages: list[tuple[str, float]] = field(default_factory=list)
    device: str = "cpu"
    threads: int = 1

    @property
    def total_s(self) -> float:
        return float(sum(s for _, s in self.stages))

    def lines(self) -> list[str]:
        """The estimate as plain lines for the console and the log."""
        c = self.counts
        out = [f"images: {c.get('train', 0)} train, {c.get('val', 0)} val, {c.get('test', 0)} test",
               f"input: {self.size_reason}",
               f"strategy: {self.strategy}, at most {self.epochs} epochs"
               + (f" ({self.freeze_epochs} head-only)" if self.strategy == "gradual" else "")
               + f", batch {self.batch_size}",
               f"measured on {self.device} ({self.threads} threads): decode {self.decode_per_s:.0f} images/s, "
               f"inference {self.infer_per_s:.1f} images/s"
               + (f", training {self.train_per_s:.1f} images/s" if self.train_per_s else "")]
        out += [f"  {name:<48} {format_duration(sec):>8}" for name, sec in self.stages]
        out.append(f"  {'total (at most; early stopping may end sooner)':<48} {format_duration(self.total_s):>8}")
        return out


def estimate_training(
    data: str | Path | None,
    *,
    labels: str | Path | None = None,
    label_columns: Sequence[str] | None = None,
    config: RunConfig | str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = False,
) -> Estimate:
    """Measure what ``train`` with these arguments would cost on this machine, without training or writing.

    Args:
        data, labels, label_columns, config, overrides: as for :func:`medtransfer.training.run.train`.
        progress: progress on stderr while indexing.

    Returns:
        An :class:`Estimate`; ``Estimate.lines()`` prints it.

    Raises:
        ManifestError, ConfigError: as ``train`` would, before any timing.
    """
    from medtransfer.data.discovery import index_scans
    from medtransfer.models.backbones import get_backbone
    from medtransfer.training.run import resolve_input_spec
    from medtransfer.training.sizing import choose_input_size

    cfg = apply_overrides(config, overrides) if isinstance(config, RunConfig) else load_config(config, list(overrides))
    data_dir = Path(data if data is not None else cfg.data.data_dir or ".").expanduser()
    lab = labels if labels is not None else cfg.data.labels
    cols = list(label_columns) if label_columns else (list(cfg.data.label_columns) if cfg.data.label_columns else None)
    manifest = index_scans(data_dir, labels=lab, label_columns=cols,
                           config=cfg.data.model_copy(update={"verify_pixels": False}),
                           spatial_dims=cfg.input.spatial_dims, progress=progress)
    cfg = cfg.model_copy(update={"input": resolve_input_spec(cfg)})
    choice = choose_input_size(cfg, manifest, fixed_input_size=get_backbone(cfg.model.backbone).fixed_input_size)
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"size": choice.size})})
    return _measure(cfg, manifest, choice.reason)


def _measure(cfg: RunConfig, manifest: Manifest, size_reason: str) -> Estimate:
    from medtransfer.data.dataset import ScanDataset
    from medtransfer.device import set_determinism
    from medtransfer.inference import forward_batches
    from medtransfer.training.fine_tune import Phase, _Trainer, plan_phases
    from medtransfer.training.run import build_run_model

    tc = cfg.train
    counts = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
    set_determinism(tc.seed, tc.deterministic)
    model = build_run_model(cfg, manifest.classes, manifest.task)
    trainer = _Trainer(model, manifest, cfg, None, False, None)
    train_m = trainer.train_m

    # decoding: a sample of scans, no cache (what the first epoch pays once per scan)
    sample = _first(train_m, DECODE_SAMPLE)
    plain = ScanDataset(sample, cfg.input, train=False, memory_cache=True)
    t0 = time.perf_counter()
    for i in range(len(plain)):
        plain.cached_image(i)
    decode_per_s = len(plain) / max(time.perf_counter() - t0, 1e-9)

    bs = tc.batch_size
    n_batch = min(len(train_m), bs * (TIMED_BATCHES + 1))
    timed = _first(train_m, n_batch)
    images = ScanDataset(timed, cfg.input, train=False, memory_cache=True)
    batches = [torch.stack([images[j]["image"] for j in range(i, min(i + bs, n_batch))]) for i in range(0, n_batch, bs)]
    forward_batches(trainer.model, [(batches[0], None)], device=trainer.device, amp=trainer.amp,
                    channels_last=trainer.channels_last)  # warm-up
    rest = batches[1:] or batches
    t0 = time.perf_counter()
    forward_batches(trainer.model, [(b, None) for b in rest], device=trainer.device, amp=trainer.amp,
                    channels_last=trainer.channels_last, output="features")
    infer_per_s = sum(len(b) for b in rest) / max(time.perf_counter() - t0, 1e-9)

    phases = plan_phases(tc.strategy, tc.epochs, tc.freeze_epochs)
    train_per_s = None
    if any(not p.frozen for p in phases):
        st = trainer.stepper(Phase("all", 0, 1, False))
        aug = ScanDataset(timed, cfg.input, train=True, augment=tc.augment, memory_cache=True)
        for i in range(len(aug)):
            aug.cached_image(i)  # decoded already above: time the training step with its augmentation only
        loader = trainer._loader(aug, shuffle=True)
        it = iter(loader)
        first = next(it)
        st.step(first["image"], first["label"])  # warm-up
        t0, n = time.perf_counter(), 0
        for batch in it:
            if len(batch["image"]) < 2:
                continue
            st.step(batch["image"], batch["label"])
            n += len(batch["image"])
        if n == 0:  # fewer than two batches of training data: time the warm-up batch again
            t0 = time.perf_counter()
            st.step(first["image"], first["label"])
            n = len(first["image"])
        train_per_s = n / max(time.perf_counter() - t0, 1e-9)

    n_all = sum(counts.values())
    n_tr, n_va = counts["train"], counts["val"]
    stages: list[tuple[str, float]] = [(f"decode {n_all} scans once (then cached)", n_all / decode_per_s)]
    unfrozen = [p for p in phases if not p.frozen]
    frozen = [p for p in phases if p.frozen]
    if frozen:
        n_head = frozen[0].end - frozen[0].start
        stages.append((f"frozen features of {n_tr + n_va} images (once)", (n_tr + n_va) / infer_per_s))
        stages.append((f"{n_head} head-only epoch(s) on cached features", 0.05 * n_head))
    if unfrozen and train_per_s:
        n_ep = unfrozen[0].end - unfrozen[0].start
        per_epoch = n_tr / train_per_s + n_va / infer_per_s
        stages.append((f"{n_ep} full epoch(s) x {format_duration(per_epoch)}", n_ep * per_epoch))
    stages.append((f"calibration on {n_va} validation images", n_va / infer_per_s))
    return Estimate(counts=counts, size=tuple(cfg.input.size), size_reason=size_reason, strategy=tc.strategy,
                    epochs=tc.epochs, freeze_epochs=tc.freeze_epochs, batch_size=bs, decode_per_s=decode_per_s,
                    infer_per_s=infer_per_s, train_per_s=train_per_s, stages=stages, device=str(trainer.device),
                    threads=configure_torch())


def _first(m: Manifest, n: int) -> Manifest:
    """The first ``n`` cases of ``m`` (timing needs a few real scans, not a representative sample)."""
    return Manifest(m.df.iloc[:n].copy(), list(m.classes), m.task, m.data_dir, list(m.warnings))
