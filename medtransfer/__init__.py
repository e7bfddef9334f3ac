"""medtransfer: turn a folder of scans into a trustworthy diagnostic classifier by transfer learning.

Public API (each name is importable as ``medtransfer.<name>``). Heavy parts (torch, MONAI, Captum) are
imported on first use, so ``import medtransfer`` and report rendering stay light (PEP 562 lazy attributes;
see docs/decisions.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medtransfer import cpu as _cpu
from medtransfer._version import __version__

# Before anything imports torch: thread count from the CPUs this process may use, short OpenMP spin-waits
# (a shared machine otherwise collapses; see medtransfer/cpu.py). The user's own settings win.
_cpu.configure_environment()

# public name -> module that defines it
_PUBLIC = {
    "MedtransferError": "medtransfer.errors",
    "ScanReadError": "medtransfer.errors",
    "ManifestError": "medtransfer.errors",
    "ConfigError": "medtransfer.errors",
    "WeightsUnavailable": "medtransfer.errors",
    "CheckpointError": "medtransfer.errors",
    "RunConfig": "medtransfer.config",
    "load_config": "medtransfer.config",
    "InputSpec": "medtransfer.data.spec",
    "Manifest": "medtransfer.data.manifest",
    "index_scans": "medtransfer.data.discovery",
    "ScanDataset": "medtransfer.data.dataset",
    "read_scan": "medtransfer.data.loading",
    "build_model": "medtransfer.models.classifier",
    "ModelCard": "medtransfer.models.card",
    "fine_tune": "medtransfer.training.fine_tune",
    "train": "medtransfer.training.run",
    "load_run": "medtransfer.run_dir",
    "generate_sample_data": "medtransfer.datasets.synthetic",
    "evaluate": "medtransfer.evaluation.evaluate",
    "EvaluationResult": "medtransfer.evaluation.result",
    "predict": "medtransfer.evaluation.predict",
    "export": "medtransfer.deploy.export",
    "explain": "medtransfer.explain.saliency",
    "explain_run": "medtransfer.explain.run",
    "render_report": "medtransfer.reports.render",
    "run_demo": "medtransfer.demo",
    "audit": "medtransfer.audit.run",
    "Audit": "medtransfer.audit.run",
    "audit_transfer": "medtransfer.audit.transfer",
    "audit_shortcuts": "medtransfer.audit.shortcuts",
    "AuditResult": "medtransfer.audit.transfer",
    "ShortcutAudit": "medtransfer.audit.shortcuts",
    "adapt": "medtransfer.adapt.site",
    "load_site": "medtransfer.adapt.site",
    "pretrain": "medtransfer.pretrain.run",
}

__all__ = [
    "__version__",
    "Audit",
    "AuditResult",
    "CheckpointError",
    "ConfigError",
    "EvaluationResult",
    "InputSpec",
    "Manifest",
    "ManifestError",
    "MedtransferError",
    "ModelCard",
    "RunConfig",
    "ScanDataset",
    "ScanReadError",
    "ShortcutAudit",
    "WeightsUnavailable",
    "adapt",
    "audit",
    "audit_shortcuts",
    "audit_transfer",
    "build_model",
    "evaluate",
    "explain",
    "explain_run",
    "export",
    "fine_tune",
    "generate_sample_data",
    "index_scans",
    "load_config",
    "load_run",
    "load_site",
    "predict",
    "pretrain",
    "read_scan",
    "render_report",
    "run_demo",
    "train",
]

assert set(__all__[1:]) == set(_PUBLIC), "keep __all__ and _PUBLIC in step"

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from medtransfer.adapt.site import adapt, load_site
    from medtransfer.audit.run import Audit, audit
    from medtransfer.audit.shortcuts import ShortcutAudit, audit_shortcuts
    from medtransfer.audit.transfer import AuditResult, audit_transfer
    from medtransfer.config import RunConfig, load_config
    from medtransfer.data.dataset import ScanDataset
    from medtransfer.data.discovery import index_scans
    from medtransfer.data.loading import read_scan
    from medtransfer.data.manifest import Manifest
    from medtransfer.data.spec import InputSpec
    from medtransfer.datasets.synthetic import generate_sample_data
    from medtransfer.demo import run_demo
    from medtransfer.deploy.export import export
    from medtransfer.errors import (
        CheckpointError,
        ConfigError,
        ManifestError,
        MedtransferError,
        ScanReadError,
        WeightsUnavailable,
    )
    from medtransfer.evaluation.evaluate import evaluate
    from medtransfer.evaluation.predict import predict
    from medtransfer.evaluation.result import EvaluationResult
    from medtransfer.explain.run import explain_run
    from medtransfer.explain.saliency import explain
    from medtransfer.models.card import ModelCard
    from medtransfer.models.classifier import build_model
    from medtransfer.pretrain.run import pretrain
    from medtransfer.reports.render import render_report
    from medtransfer.run_dir import load_run
    from medtransfer.training.fine_tune import fine_tune
    from medtransfer.training.run import train


def __getattr__(name: str) -> Any:
    if name == "datasets":  # the public-dataset sub-package: mt.datasets.prepare, mt.datasets.list_datasets
        return importlib.import_module("medtransfer.datasets")
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'medtransfer' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
