"""What a run directory holds, read once for the report (no torch): :class:`RunFiles`, :func:`load_run_files`."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medtransfer.data.manifest import Manifest
from medtransfer.digest import sha256_file
from medtransfer.errors import MedtransferError
from medtransfer.evaluation.result import EvaluationResult
from medtransfer.models.card import ModelCard

logger = logging.getLogger(__name__)


@dataclass
class RunFiles:
    """What a run directory holds; every field but ``run_dir`` may be missing (None / empty)."""

    run_dir: Path
    result: EvaluationResult | None = None
    card: ModelCard | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_sha256: str | None = None
    manifest: Manifest | None = None
    history: pd.DataFrame | None = None
    saliency: pd.DataFrame | None = None
    sanity: dict[str, pd.DataFrame] = field(default_factory=dict)
    audit: dict[str, Any] | None = None
    weights_sha256: str | None = None
    external: dict[str, EvaluationResult] = field(default_factory=dict)
    #: site name -> {"shift": shift.json, "profile": profile.json, "table": adaptation.csv} (``medtransfer adapt``)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_run_files(run_dir: Path, result: EvaluationResult | None = None) -> RunFiles:
    """Read the files a report renders from; missing ones stay None (corrupt ones are logged and skipped).

    Args:
        run_dir: the run directory (``model_card.json``, ``config.yaml``, ``manifest.csv``, ...).
        result: an evaluation already in memory; default ``<run_dir>/evaluation.json`` when present.
    """
    files = RunFiles(run_dir=run_dir, result=result)
    if result is None and (run_dir / "evaluation.json").is_file():
        files.result = EvaluationResult.load(run_dir)
    files.card = _optional(lambda: ModelCard.load(run_dir / "model_card.json"), run_dir / "model_card.json")
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        raw = cfg.read_bytes()
        files.config_sha256 = hashlib.sha256(raw).hexdigest()
        files.config = _optional(lambda: yaml.safe_load(raw) or {}, cfg) or {}
    if (run_dir / "manifest.csv").is_file():
        files.manifest = _optional(lambda: Manifest.load(run_dir), run_dir / "manifest.csv")
    if (run_dir / "history.csv").is_file():
        files.history = _optional(lambda: pd.read_csv(run_dir / "history.csv"), run_dir / "history.csv")
    sal = run_dir / "saliency"
    if (sal / "index.csv").is_file():
        files.saliency = _optional(lambda: pd.read_csv(sal / "index.csv", dtype={"case_id": str, "hint": str}),
                                   sal / "index.csv")
        for path in sorted(sal.glob("sanity_*.csv")):
            table = _optional(lambda p=path: pd.read_csv(p), path)
            if table is not None:
                files.sanity[path.stem.removeprefix("sanity_")] = table
    audit = {name: _optional(lambda p=path: json.loads(p.read_text("utf-8")), path)
             for name in ("transfer", "shortcuts") if (path := run_dir / "audit" / f"{name}.json").is_file()}
    files.audit = {k: v for k, v in audit.items() if v is not None} or None
    for path in sorted(run_dir.glob("external/*/evaluation.json")):
        if result is not None and result.saved_to is not None and Path(result.saved_to) == path.parent:
            continue  # the report of this external evaluation itself
        loaded = _optional(lambda p=path: EvaluationResult.load(p.parent), path)
        if loaded is not None:
            files.external[path.parent.name] = loaded
    for folder in sorted(p.parent for p in run_dir.glob("sites/*/profile.json")):
        site = {"shift": _optional(lambda f=folder: json.loads((f / "shift.json").read_text("utf-8")),
                                   folder / "shift.json") if (folder / "shift.json").is_file() else None,
                "profile": _optional(lambda f=folder: json.loads((f / "profile.json").read_text("utf-8")),
                                     folder / "profile.json"),
                "table": _optional(lambda f=folder: pd.read_csv(f / "adaptation.csv"), folder / "adaptation.csv")
                if (folder / "adaptation.csv").is_file() else None}
        if site["profile"] is not None:
            files.sites[folder.name] = site
    if (run_dir / "model.safetensors").is_file():
        files.weights_sha256 = sha256_file(run_dir / "model.safetensors")
    return files


def _optional(read: Any, path: Path) -> Any:
    """``read()``, or None (logged) when the file is missing or cannot be parsed."""
    try:
        return read()
    except (OSError, ValueError, yaml.YAMLError, MedtransferError) as exc:
        logger.warning("%s: not used in the report (%s)", path.name, exc)
        return None
