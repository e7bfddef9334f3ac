"""A trained run as an object: :class:`Run` and :func:`load_run` (DESIGN.md §4, the run directory).

A leaf for every stage that reads a finished run (evaluation, prediction, explanation, audit, export):
it depends on the data, model and inference layers only, so none of them needs the training code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medtransfer import device as dev
from medtransfer.config import RunConfig, load_config
from medtransfer.data.dataset import preprocess as preprocess_scan
from medtransfer.data.manifest import Manifest
from medtransfer.errors import RunDirError
from medtransfer.inference import forward_batches, score_cases, score_files
from medtransfer.models.card import ModelCard
from medtransfer.models.checkpoint import load_model
from medtransfer.models.outputs import decisions, probabilities, scored_classes

ScanPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass
class Run:
    """A trained run loaded from disk.

    Attributes:
        path: the run directory.
        model: the classifier with its best weights, in eval mode, on CPU.
        card: the model card (classes, input spec, thresholds, temperature, training summary).
        manifest: the indexed cases with splits (None if ``manifest.csv`` is absent).
        history: per-epoch history (empty if absent).
        config: the resolved run config.
    """

    path: Path
    model: torch.nn.Module
    card: ModelCard
    manifest: Manifest | None
    history: pd.DataFrame
    config: RunConfig

    @property
    def cache_dir(self) -> Path:
        """The decoded-image cache of this run (``data.cache_dir`` or ``<run>/cache``)."""
        return Path(self.config.data.cache_dir) if self.config.data.cache_dir else self.path / "cache"

    def predict(self, data: Manifest | ScanPaths | torch.Tensor, *, batch_size: int = 32, device: str = "auto",
                progress: bool = False) -> pd.DataFrame:
        """Calibrated probabilities and decisions for scans, with this run's preprocessing and operating points.

        Args:
            data: scan files and/or folders (folders are indexed like training data: DICOM by content, a
                series is one case); or a :class:`Manifest` of cases (e.g. ``run.manifest.split("test")``);
                or a float tensor (N, C, *size) already preprocessed with ``card.input``.
            batch_size, device: inference settings (``device="auto"``: CUDA with AMP when present).
            progress: progress on stderr.

        Returns:
            For files/folders: ``case_id`` (pseudonymous), ``file``, ``p_<class>`` (calibrated), ``pred_<class>``
            (1/0 at the stored operating point), ``predicted`` and ``error`` (why a file could not be scored;
            it never stops the others). For a Manifest: the full predictions table (``predictions.csv``
            columns). For a tensor: ``p_<class>``, ``pred_<class>``, ``predicted``.

        Examples:
            >>> run = load_run("runs/cxr1")  # doctest: +SKIP
            >>> run.predict(["new_scans/"])[["file", "p_pneumonia", "predicted"]]  # doctest: +SKIP
        """
        kw = {"batch_size": batch_size, "device": device, "progress": progress}
        if isinstance(data, Manifest):
            return score_cases(self.model, self.card, data, amp=self.config.train.amp, cpu_bf16=self.config.train.cpu_bf16,
                               num_workers=self.config.train.num_workers, cache_dir=self.cache_dir, **kw)
        if isinstance(data, torch.Tensor):
            return self._predict_tensor(data, batch_size=batch_size, device=device)
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        return score_files(self.model, self.card, paths, amp=self.config.train.amp, cpu_bf16=self.config.train.cpu_bf16,
                           num_workers=self.config.train.num_workers, **kw)

    def preprocess(self, paths: ScanPaths | Sequence[Sequence[str | os.PathLike[str]]]) -> torch.Tensor:
        """The exact model input for scan files: the batch :meth:`predict` feeds the model for them.

        The same code path as prediction and evaluation (:func:`medtransfer.data.dataset.preprocess` with the
        card's ``InputSpec``: decode, orient, resample, window, resize, quantise as the image cache stores it,
        replicate channels, normalise), so ``run.predict(run.preprocess(files))`` equals ``run.predict(files)``
        and an exported model (:func:`medtransfer.export`) can be fed and compared on the same tensor.

        Args:
            paths: one case or a list of cases. A case is a scan file, a DICOM series folder, or (volumes) the
                list of one series' files; a plain list of paths is a list of cases, one per path.

        Returns:
            float32 tensor (N, C, *card.input.size) on the CPU: (N, C, H, W) for images, (N, C, D, H, W) for
            volumes, normalised with the card's mean/std.

        Raises:
            ScanReadError: a case cannot be read or does not fit the model (the reason says what to do).

        Examples:
            >>> run = load_run("runs/cxr1")  # doctest: +SKIP
            >>> x = run.preprocess(["a.dcm", "b.dcm"])  # doctest: +SKIP
            >>> x.shape  # doctest: +SKIP
            torch.Size([2, 1, 224, 224])
            >>> run.predict(x)["p_pneumonia"]  # the same probabilities as run.predict(["a.dcm", "b.dcm"])  # doctest: +SKIP
        """
        cases = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not cases:
            raise ValueError("preprocess() needs at least one scan file or series folder")
        items = [[Path(f) for f in c] if isinstance(c, Sequence) and not isinstance(c, str) else Path(c)
                 for c in cases]
        return torch.stack([preprocess_scan(item, self.card.input) for item in items])

    def _predict_tensor(self, x: torch.Tensor, *, batch_size: int, device: str) -> pd.DataFrame:
        target = dev.resolve_device(device)
        home = next(self.model.parameters()).device
        try:
            batches = ((x[i:i + batch_size], None) for i in range(0, len(x), batch_size))
            logits, _ = forward_batches(self.model.to(target), batches, device=target)
        finally:
            self.model.to(home)
        p = probabilities(logits.numpy().reshape(len(x), -1), self.card)
        flags, predicted = decisions(p, self.card)
        classes = scored_classes(self.card)
        table = pd.DataFrame({f"p_{c}": p[:, j] for j, c in enumerate(classes)})
        for j, c in enumerate(classes):
            table[f"pred_{c}"] = flags[:, j].astype(np.int64)
        table["predicted"] = predicted
        return table


def load_run(path: str | os.PathLike[str], *, device: str = "cpu") -> Run:
    """Load a run directory written by ``medtransfer train`` (weights, card, manifest, history, config).

    Raises:
        RunDirError: not a finished run directory (no ``model_card.json``), with what to give instead.

    Examples:
        >>> run = load_run("runs/cxr1")  # doctest: +SKIP
        >>> run.predict(["new_scan.dcm"])  # doctest: +SKIP
    """
    p = Path(path)
    if not (p / "model_card.json").is_file():
        hint = (" It looks like a data folder; give the run directory written by 'medtransfer train' (its --out)."
                if p.is_dir() and not (p / "config.yaml").is_file() else
                " Give the run directory written by 'medtransfer train' (its --out folder), e.g. runs/cxr1.")
        raise RunDirError(f"{p}: no model_card.json — not a finished run directory.{hint}")
    model, card = load_model(p, device=device)
    manifest = Manifest.load(p) if (p / "manifest.csv").is_file() else None
    history = pd.read_csv(p / "history.csv") if (p / "history.csv").is_file() else pd.DataFrame()
    config = load_config(p / "config.yaml") if (p / "config.yaml").is_file() else RunConfig()
    return Run(p, model, card, manifest, history, config)
