"""Experiment tracking beyond ``history.csv``: TensorBoard event files and MLflow, when asked for.

Both are optional extras (``tensorboard``, ``mlflow``); asking for one without it installed raises a
:class:`~medtransfer.errors.MissingDependency` that names the extra. Only rank 0 logs (DDP-ready).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medtransfer._optional import require
from medtransfer.config import RunConfig

logger = logging.getLogger(__name__)

_SCALARS = ("lr", "train_loss", "val_loss", "val_auroc")


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


class Trackers:
    """Fan-out of per-epoch rows to TensorBoard / MLflow."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self._tb: Any = None
        self._mlflow: Any = None
        if not is_rank_zero():
            return
        if cfg.train.tensorboard:
            require("tensorboard", extra="tensorboard", purpose="--tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.train.mlflow:
            self._mlflow = require("mlflow", extra="mlflow", purpose="--mlflow")
            self._mlflow.start_run(run_name=run_dir.name)
            flat = {f"{sec}.{k}": v for sec, d in cfg.model_dump(mode="json").items() if isinstance(d, dict)
                    for k, v in d.items() if not isinstance(v, (dict, list))}
            self._mlflow.log_params({k: v for k, v in flat.items() if k.split(".")[0] != "data"})

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Log one history row (epoch, lr, losses, val AUROC)."""
        step = int(row["epoch"])
        for key in _SCALARS:
            value = row.get(key)
            if value is None or value != value:  # skip NaN
                continue
            if self._tb is not None:
                self._tb.add_scalar(key, float(value), step)
            if self._mlflow is not None:
                self._mlflow.log_metric(key, float(value), step=step)

    def close(self) -> None:
        """Flush and close writers."""
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
