"""``audit``: the transfer and shortcut audits of a scan folder or a trained run, as one call.

The CLI's ``medtransfer audit`` is this function plus printing: whether the argument is a run directory (its
manifest, splits and config are reused) or a data folder (indexed with a config preset) is decided here, so
the Python API does exactly what the command does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtransfer.audit.shortcuts import ShortcutAudit, audit_shortcuts
from medtransfer.audit.transfer import AuditResult, audit_transfer
from medtransfer.config import RunConfig, load_config
from medtransfer.run_dir import load_run

DEFAULT_STRATEGIES = ("scratch", "linear-probe", "gradual")
DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@dataclass
class Audit:
    """What :func:`audit` did.

    Attributes:
        out: the audit folder (``transfer.json``, ``shortcuts.json``, ``cells/``).
        transfer: the transfer audit, or None when not asked for.
        shortcuts: the shortcut audit, or None when not asked for or impossible (see ``skipped``).
        skipped: why a part did not run, one sentence each.
    """

    out: Path
    transfer: AuditResult | None = None
    shortcuts: ShortcutAudit | None = None
    skipped: list[str] = field(default_factory=list)


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """True for a finished run directory (it holds ``model_card.json``)."""
    return (Path(path) / "model_card.json").is_file()


def audit(
    data_or_run: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    config: RunConfig | str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    run: str | os.PathLike[str] | None = None,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: int = 3,
    budget_epochs: int = 6,
    transfer: bool = True,
    shortcuts: bool = True,
    progress: bool = False,
    sources: dict[str, str] | None = None,
) -> Audit:
    """Does pretraining help on this data (transfer audit), and is the model learning the hospital (shortcuts)?

    Args:
        data_or_run: a run directory (its manifest, splits and config are reused; the shortcut audit uses its
            model) or a scan folder (indexed with ``config``, default the ``quickstart`` preset).
        labels: labels CSV for a scan folder.
        config: a RunConfig, YAML path or preset name; default the run's config, else ``quickstart``.
        out: the audit folder; default ``<run>/audit``, else ``runs/audit``.
        run: the trained run for the shortcut audit when ``data_or_run`` is a scan folder.
        strategies, fractions, seeds, budget_epochs: the transfer audit's grid (see
            :func:`~medtransfer.audit.transfer.audit_transfer`).
        transfer, shortcuts: which audits to run.
        progress: progress display.
        sources: other starting points to compare with the run's own weights, ``{name: spec}``: a
            ``medtransfer pretrain`` folder, a weights file, or a backbone (``timm:<name>``); see
            :func:`~medtransfer.audit.transfer.audit_transfer`.

    Returns:
        :class:`Audit`. Both audits resume from finished cells when run again with the same settings.

    Examples:
        >>> import medtransfer as mt
        >>> a = mt.audit("runs/cxr1", seeds=1, strategies=["linear-probe", "scratch"])  # doctest: +SKIP
        >>> a.transfer.summary["data_efficiency"]  # doctest: +SKIP
    """
    source = Path(data_or_run)
    run_dir = Path(run) if run is not None else (source if is_run_dir(source) else None)
    target = Path(out) if out is not None else (run_dir / "audit" if run_dir is not None else Path("runs/audit"))
    result = Audit(out=target)
    if transfer:
        cases: Any
        if is_run_dir(source):
            loaded = load_run(source)
            cfg = config if isinstance(config, RunConfig) else load_config(config) if config else loaded.config
            cases = loaded.manifest
        else:
            cfg = config if isinstance(config, RunConfig) else load_config(config or "quickstart")
            cases = source
        result.transfer = audit_transfer(cases, labels=labels, config=cfg, strategies=tuple(strategies),
                                         fractions=tuple(fractions), seeds=seeds, budget_epochs=budget_epochs,
                                         out=target, progress=progress, sources=sources)
    if shortcuts:
        if run_dir is None:
            result.skipped.append("shortcut audit skipped: it needs a trained run (pass run=RUN_DIR, or a run "
                                  "directory as the first argument)")
        else:
            result.shortcuts = audit_shortcuts(run_dir, out=target, progress=progress)
    return result
