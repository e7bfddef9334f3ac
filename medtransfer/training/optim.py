"""Optimisers and learning-rate schedules.

Schedules are stepped per batch (``cosine`` with linear warmup, ``onecycle``) or per epoch on the
validation metric (``plateau``: CheXNet's ÷10 when validation stops improving). Each param group keeps its
own base LR, so discriminative LRs (fastai) survive every schedule.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from medtransfer.config import TrainConfig

Interval = Literal["batch", "epoch"]


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default), Adam or SGD over ``groups`` (each with ``params`` and ``lr``).

    Weight decay is not applied to biases and normalisation parameters (1-D tensors), as is standard.
    """
    split: list[dict[str, Any]] = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        base = {k: v for k, v in g.items() if k != "params"}
        if decay:
            split.append({**base, "params": decay, "weight_decay": cfg.weight_decay})
        if no_decay:
            split.append({**base, "params": no_decay, "weight_decay": 0.0})
    if not split:
        raise ValueError("no trainable parameters: every parameter is frozen")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(split, lr=cfg.lr, momentum=0.9, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(split, lr=cfg.lr)
    return torch.optim.AdamW(split, lr=cfg.lr)


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``floor`` at ``total``.

    A small picklable-free callable object: LambdaLR saves its ``__dict__`` in the state dict, so a
    resumed scheduler continues exactly.
    """

    def __init__(self, warmup: int, total: int, floor: float = 0.01) -> None:
        self.warmup = max(0, int(warmup))
        self.total = max(1, int(total))
        self.floor = floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, steps_per_epoch: int, epochs: int
) -> tuple[LRScheduler | ReduceLROnPlateau | None, Interval]:
    """The schedule named by ``cfg.scheduler`` and how often to step it.

    Args:
        optimizer: built by :func:`build_optimizer`.
        cfg: the training config.
        steps_per_epoch: optimiser steps in one epoch.
        epochs: epochs this schedule spans (a phase of gradual unfreezing spans only its own epochs).
    """
    total = max(1, steps_per_epoch * epochs)
    if cfg.scheduler == "cosine":
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        return LambdaLR(optimizer, WarmupCosine(warmup, total)), "batch"
    if cfg.scheduler == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=0.25), "batch"
    if cfg.scheduler == "plateau":
        mode = "min" if cfg.plateau_on == "val_loss" else "max"
        sched = ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        return sched, "epoch"
    return None, "epoch"


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest LR over param groups (the head's, under discriminative LRs)."""
    return max(g["lr"] for g in optimizer.param_groups)
