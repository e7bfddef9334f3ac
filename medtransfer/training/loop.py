"""The inner loops: one training epoch, and one inference pass. No strategy logic lives here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from medtransfer import distributed, faults
from medtransfer.device import autocast, to_device
from medtransfer.inference import forward_batches
from medtransfer.training.losses import logits_to_scores


@dataclass
class Stepper:
    """Everything one optimisation step needs.

    Attributes:
        model: maps a batch of inputs (images, or cached features for the head phase) to logits (N, K).
        optimizer, scheduler, interval: the optimiser, its schedule and when to step it ("batch"/"epoch").
        loss_fn: a :class:`~medtransfer.training.losses.TaskLoss`.
        device, amp: where to run and the autocast dtype (None = full precision).
        scaler: GradScaler (active only for float16).
        grad_clip: max global grad norm, or None.
        channels_last: convert 4D image batches on CUDA.
        accumulate: micro-batches per step: a batch is split into this many parts, each forward/backward on
            its own (activation memory of one part), gradients summed, then one optimiser step. Under DDP
            gradients are all-reduced once per step, on the last part (``no_sync`` before).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    interval: str
    loss_fn: nn.Module
    device: torch.device
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    grad_clip: float | None = None
    channels_last: bool = False
    accumulate: int = 1

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One forward/backward/update (over ``accumulate`` micro-batches); returns the batch's mean loss."""
        faults.point("step")  # crash tests: a SIGKILL just before an optimiser step
        x = to_device(x, self.device, channels_last=self.channels_last)
        y = y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        parts = max(1, min(self.accumulate, len(x)))
        bounds = [len(x) * k // parts for k in range(parts + 1)]
        total = torch.zeros((), device=self.device)
        for k in range(parts):
            xs, ys = x[bounds[k]:bounds[k + 1]], y[bounds[k]:bounds[k + 1]]
            last = k == parts - 1
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(self.device, self.amp):
                    logits = self.model(xs)
                # each part's mean loss weighted by its share: the gradients sum to the whole batch's mean loss
                loss = self.loss_fn(logits, ys) * (len(xs) / len(x))
                self.scaler.scale(loss).backward()
            total += loss.detach().float()  # read back once per step, not per micro-batch (a GPU sync)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None and self.interval == "batch":
            self.scheduler.step()
        return float(total)

    def end_epoch(self, metric: float) -> None:
        """Step an epoch-level schedule (ReduceLROnPlateau on the validation metric)."""
        if self.scheduler is None or self.interval != "epoch":
            return
        if isinstance(self.scheduler, ReduceLROnPlateau):
            if np.isfinite(metric):
                self.scheduler.step(metric)
        else:
            self.scheduler.step()


def batch_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a ScanDataset dict batch or a (features, targets) tuple batch."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def train_epoch(stepper: Stepper, batches: Iterable[Any], *, on_batch: Any = None) -> float:
    """Run one epoch; returns the mean training loss (weighted by batch size)."""
    stepper.model.train()
    total, n = 0.0, 0
    for batch in batches:
        x, y = batch_xy(batch)
        loss = stepper.step(x, y)
        total += loss * len(x)
        n += len(x)
        if on_batch is not None:
            on_batch(loss)
    return total / max(n, 1)


def predict_batches(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    task: str,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    loss_fn: nn.Module | None = None,
    gather: bool = False,
) -> dict[str, Any]:
    """Validation during training: one pass of :func:`medtransfer.inference.forward_batches`, plus scores and loss.

    ``gather``: ``batches`` are this rank's block of the cases (under DDP); logits and targets of every rank
    are gathered in rank order first, so every rank computes the same metrics over all cases.

    Returns:
        dict with ``scores`` (binary (N,), else (N, K)) as probabilities, ``logits`` (N, K), ``targets``
        (as the dataset gives them) and ``loss`` (mean, when ``loss_fn`` is given and targets are present).
    """
    lg, tg = forward_batches(model, batches, device=device, amp=amp, channels_last=channels_last)
    if gather and distributed.active():
        lg, tg = distributed.gather_rows(lg), distributed.gather_rows(tg)
    result: dict[str, Any] = {"logits": lg.numpy(), "scores": logits_to_scores(lg, task).numpy(), "targets": tg.numpy()}
    if loss_fn is not None and len(lg):
        result["loss"] = float(loss_fn.to("cpu")(lg, tg))
        loss_fn.to(device)
    return result


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Any], *, device: torch.device,
                       channels_last: bool = False) -> int:
    """Re-estimate every training BatchNorm's running statistics as the exact average over ``batches``.

    "Precise BN" (Wu & Johnson, 2021): running statistics kept with momentum 0.1 lag the weights, and after
    few steps from random initialisation they are mostly the initial (0, 1), so an eval-mode model can
    saturate and give every image the same score. One extra forward pass over the training data fixes it.
    Only BatchNorm layers currently in train mode are touched; returns how many were.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    try:
        for batch in batches:
            x, _ = batch_xy(batch)
            x = x.to(device, non_blocking=True)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
    return len(bns)
