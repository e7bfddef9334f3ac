"""The clinician-facing report (DESIGN.md §3: reports/): ``render_report(run_dir)`` -> report.html + report.pdf.

- :mod:`~medtransfer.reports.render`: reads a run directory and writes the files (Jinja2, WeasyPrint);
- :mod:`~medtransfer.reports.context`: every number and sentence the template shows, built from the run;
- :mod:`~medtransfer.reports.figures`: matplotlib (Agg) figures and the saliency gallery as data URIs;
- :mod:`~medtransfer.reports.checklist`: page-1 warnings, limitations, CLAIM 2024 / TRIPOD+AI mapping.

Nothing here imports torch, MONAI or Captum: a report re-renders in seconds from a saved run.
"""

from __future__ import annotations

from medtransfer.reports.render import PdfUnavailable, render_report

__all__ = ["PdfUnavailable", "render_report"]
