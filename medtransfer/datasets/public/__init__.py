"""Public chest X-ray datasets in one command: read the official files, write an ordinary labels CSV.

``prepare("nih", "/data/ChestX-ray14")`` reads the dataset's own files as distributed and writes a labels CSV
(``path`` relative to ROOT, one 0/1/blank column per finding, ``patient_id``, ``study_id``, ``sex``, ``age``,
``view``, ``site``, ``split``) that ``medtransfer index`` and ``medtransfer train`` use unchanged, plus a summary
JSON beside it. Each dataset is one adapter module (registered in :data:`ADAPTERS`, imported only when used);
the contract an adapter follows is in :mod:`medtransfer.datasets.public.base`.

Examples:
    >>> from medtransfer.datasets.public import ADAPTERS
    >>> sorted(ADAPTERS)[:3]
    ['chexpert', 'covid', 'kermany']
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from medtransfer.datasets.public.base import VOCABULARY, DatasetInfo, PrepareOptions
from medtransfer.datasets.public.prepared import PreparedDataset, prepare_adapter
from medtransfer.errors import ConfigError

logger = logging.getLogger(__name__)

#: Registry name -> adapter module (imported lazily: an adapter may need pydicom, the registry does not).
ADAPTERS: dict[str, str] = {
    "nih": "medtransfer.datasets.public.nih",
    "chexpert": "medtransfer.datasets.public.chexpert",
    "mimic": "medtransfer.datasets.public.mimic",
    "rsna": "medtransfer.datasets.public.rsna",
    "kermany": "medtransfer.datasets.public.kermany",
    "vindr": "medtransfer.datasets.public.vindr",
    "padchest": "medtransfer.datasets.public.padchest",
    "covid": "medtransfer.datasets.public.covid",
}

__all__ = ["ADAPTERS", "VOCABULARY", "DatasetInfo", "PrepareOptions", "PreparedDataset", "list_datasets",
           "load_adapter", "prepare"]


def load_adapter(name: str) -> ModuleType:
    """The adapter module of a registered dataset.

    Raises:
        ConfigError: ``name`` is not registered (the message lists the names).
    """
    key = str(name).strip().lower()
    if key not in ADAPTERS:
        raise ConfigError(f"unknown dataset '{name}'; known: {', '.join(ADAPTERS)}. "
                          "See `medtransfer datasets list`.")
    return importlib.import_module(ADAPTERS[key])


def list_datasets() -> list[DatasetInfo]:
    """The description of every registered dataset, in registry order.

    Examples:
        >>> [info.name for info in list_datasets()][:2]
        ['nih', 'chexpert']
    """
    out = []
    for name, module in ADAPTERS.items():
        try:
            out.append(load_adapter(name).INFO)
        except ModuleNotFoundError as exc:  # an adapter still being written; never hide another missing module
            if exc.name != module:
                raise
            logger.warning("dataset adapter %s is not available in this version", name)
    return out


def prepare(name: str, root: str | Path, *, out: str | Path | None = None, findings: str = "native",
            uncertain: str = "ignore", views: Sequence[str] | None = None, allow_missing: bool = False,
            val_fraction: float = 0.1, seed: int = 0) -> PreparedDataset:
    """Read a public dataset's official files and write a labels CSV and its summary.

    Args:
        name: the dataset (``medtransfer datasets list``): nih, chexpert, mimic, rsna, kermany, vindr, padchest,
            covid.
        root: the dataset's folder as downloaded and extracted.
        out: the labels CSV to write; default ``./<name>_labels.csv``. The summary goes beside it
            (``<stem>.summary.json``).
        findings: ``native`` (the dataset's own finding names) or ``harmonised`` (the 18 torchxrayvision names
            of :data:`VOCABULARY`, in that order; a finding the dataset never labels is blank, never 0).
        uncertain: CheXpert/MIMIC ``-1``: ``ignore`` (blank: unknown, masked from the loss), ``ones``, ``zeros``.
        views: keep only these views (``PA``, ``AP``, ``LATERAL``, ``LL``...; ``FRONTAL``/``LATERAL`` for the
            groups); None keeps all.
        allow_missing: drop the listed images missing on disk (counted in the summary) instead of failing.
        val_fraction: the share of patients carved from an official train split into ``val`` where the dataset
            has no validation split.
        seed: salts that carve.

    Returns:
        The CSV and summary paths, the summary and the ``medtransfer train`` command to run next.

    Raises:
        ConfigError: unknown dataset or option value.
        DatasetLayoutError: ROOT does not hold the files the adapter reads (the message names them and says where
            the dataset is distributed), or listed images are missing and ``allow_missing`` is off.

    Examples:
        >>> import medtransfer as mt
        >>> result = mt.datasets.prepare("nih", "/data/ChestX-ray14", findings="harmonised")  # doctest: +SKIP
        >>> print(result.train_command)  # doctest: +SKIP
    """
    adapter = load_adapter(name)
    return prepare_adapter(adapter.INFO, adapter.read, root, out=out, findings=findings, uncertain=uncertain,
                           views=views, allow_missing=allow_missing, val_fraction=val_fraction, seed=seed)
