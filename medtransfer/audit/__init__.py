"""Transfer and shortcut audits (DESIGN.md §3): does pretraining help here, and is the model learning the hospital?

- :func:`~medtransfer.audit.transfer.audit_transfer`: strategies x training fractions x seeds under one
  budget; learning curve, data-efficiency gain, time-to-target, negative-transfer warning.
- :func:`~medtransfer.audit.shortcuts.audit_shortcuts`: site/manufacturer/view probe, leave-one-site-out,
  prevalence vs predicted rate by site, saliency by site.
"""

from __future__ import annotations

from medtransfer._callable import make_callable
from medtransfer.audit.shortcuts import ShortcutAudit, audit_shortcuts
from medtransfer.audit.transfer import AuditResult, audit_transfer

__all__ = ["AuditResult", "ShortcutAudit", "audit_shortcuts", "audit_transfer"]

# the package shares its name with ``mt.audit``: callable, so ``mt.audit(...)`` works in any import order
make_callable(__name__, "medtransfer.audit.run:audit")
