"""``render_report``: a run directory (or an evaluation) -> ``report.html`` (+ ``report.pdf``).

Pure rendering: it reads the files a run directory holds (``evaluation.json``, ``predictions.csv``,
``model_card.json``, ``config.yaml``, ``manifest.csv``, ``history.csv``, ``saliency/``, optional
``audit/transfer.json``, ``audit/shortcuts.json``) and never imports torch, MONAI or Captum, so a report rebuilds in seconds on any machine.
The HTML is one self-contained file (CSS inline, figures as base64 PNG); the PDF is the same HTML through
WeasyPrint (the ``pdf`` extra). Both are written atomically.

A run without ``evaluation.json`` still renders: every performance field says "not provided" and the
report tells the reader to run ``medtransfer evaluate RUN_DIR`` (a red warning on page 1).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtransfer import io
from medtransfer._optional import require
from medtransfer.errors import ConfigError, MissingDependency, RunDirError
from medtransfer.evaluation.result import EvaluationResult
from medtransfer.reports.context import build_context, site_profile_facts
from medtransfer.reports.files import RunFiles, load_run_files

logger = logging.getLogger(__name__)

FORMATS = ("html", "pdf")
TEMPLATES = Path(__file__).parent / "templates"
PDF_HINT = 'pip install "medtransfer[pdf]"'
_DATA_URI = re.compile(r"(data:image/[a-z]+;base64,[A-Za-z0-9+/=]+)")


class PdfUnavailable(MissingDependency):
    """The PDF could not be made (WeasyPrint or its system libraries missing); ``outputs`` holds what was written.

    Attributes:
        outputs: format -> path of the files that were written (the HTML).
    """

    def __init__(self, message: str, outputs: dict[str, Path]) -> None:
        super().__init__(message)
        self.outputs = outputs


def render_report(
    result_or_run_dir: EvaluationResult | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    formats: Sequence[str] = FORMATS,
    site: str | None = None,
) -> dict[str, Path]:
    """Render the clinician-facing report of a run.

    Args:
        result_or_run_dir: a run directory (written by ``medtransfer train``; ``medtransfer evaluate`` adds
            the metrics), or an :class:`EvaluationResult` (its run is found from ``result.saved_to``: the run
            directory or ``<run>/external/<name>``).
        out_dir: folder for ``report.html`` / ``report.pdf``; default: the run directory (or where the
            result was saved).
        formats: any of ``"html"``, ``"pdf"``. The HTML is always built; it is written when asked for,
            or when the PDF cannot be made.
        site: a site profile of the run (``medtransfer adapt``): the Model Facts page says the report describes
            the model as that profile adapts it (pass that site's evaluation, ``RUN/sites/NAME/evaluation/...``,
            as ``result_or_run_dir`` for its metrics). Every site profile gets a "Transfer to <site>" section
            whether or not ``site`` is given.

    Returns:
        Format -> path written, e.g. ``{"html": Path("runs/cxr1/report.html"), "pdf": ...}``.

    Raises:
        RunDirError: not a run directory (no ``model_card.json`` nor ``evaluation.json``).
        ConfigError: an unknown format.
        PdfUnavailable: ``pdf`` asked for but WeasyPrint (``pip install "medtransfer[pdf]"``) or its system
            libraries are missing; the HTML was written first and ``exc.outputs`` names it.

    Examples:
        >>> render_report("runs/cxr1")  # doctest: +SKIP
        {'html': PosixPath('runs/cxr1/report.html'), 'pdf': PosixPath('runs/cxr1/report.pdf')}
    """
    wanted = _check_formats(formats)
    started = time.perf_counter()
    run_dir, result = _resolve(result_or_run_dir)
    out = Path(out_dir) if out_dir is not None else (result.saved_to if result is not None and result.saved_to
                                                     else run_dir)
    files = load_run_files(run_dir, result)
    ctx = build_context(files)
    if site is not None:
        ctx["site_profile"] = site_profile_facts(files, site)
    html = scrub(render_html(ctx), _private_paths(files))
    outputs: dict[str, Path] = {}
    if "html" in wanted:
        outputs["html"] = io.write_text(out / "report.html", html)
    if "pdf" in wanted:
        try:
            weasyprint = _weasyprint()
        except MissingDependency as exc:  # the HTML is still worth having: write it, then say what is missing
            html_path = outputs.get("html") or io.write_text(out / "report.html", html)
            raise PdfUnavailable(f"{exc} The HTML report was written to {html_path}.", {"html": html_path}) from exc
        outputs["pdf"] = write_pdf(html, out / "report.pdf", weasyprint)
    logger.info("report for %s rendered in %.1f s: %s", run_dir.name, time.perf_counter() - started,
             ", ".join(str(p) for p in outputs.values()))
    return outputs


def _check_formats(formats: Sequence[str]) -> set[str]:
    wanted = {str(f).lower() for f in ([formats] if isinstance(formats, str) else formats)}
    unknown = sorted(wanted - set(FORMATS))
    if unknown or not wanted:
        raise ConfigError(f"unknown report format(s) {unknown or '(none given)'}; expected one or both of "
                          f"{', '.join(FORMATS)}")
    return wanted


def _resolve(arg: EvaluationResult | str | os.PathLike[str]) -> tuple[Path, EvaluationResult | None]:
    """(run directory, result or None): a result's run is the first folder up from ``saved_to`` with a card."""
    if isinstance(arg, EvaluationResult):
        if arg.saved_to is None:
            raise RunDirError("this evaluation was never saved, so its run directory is unknown; save it first "
                              "(result.save(DIR)) or pass the run directory")
        here = Path(arg.saved_to)  # the run, <run>/external/<name>, or <run>/sites/<site>/evaluation/<...>
        for folder in (here, *list(here.parents)[:5]):
            if (folder / "model_card.json").is_file():
                return folder, arg
        return here, arg
    run_dir = Path(arg)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a folder; give a run directory written by 'medtransfer train'")
    if not (run_dir / "model_card.json").is_file() and not (run_dir / "evaluation.json").is_file():
        raise RunDirError(f"{run_dir}: neither model_card.json nor evaluation.json found; give a run directory "
                          "written by 'medtransfer train' (then 'medtransfer evaluate RUN_DIR')")
    if not (run_dir / "model_card.json").is_file():  # an evaluation folder (<run>/external/<name>): its run above
        for folder in (run_dir.parent, run_dir.parent.parent):
            if (folder / "model_card.json").is_file():
                return folder, EvaluationResult.load(run_dir)
    return run_dir, None


def _weasyprint() -> Any:
    """The weasyprint module, or MissingDependency naming the extra (and the system libraries it needs)."""
    try:
        return require("weasyprint", extra="pdf", purpose="the PDF report")
    except OSError as exc:  # weasyprint installed but pango/cairo system libraries missing
        raise MissingDependency(f"WeasyPrint is installed but cannot load its system libraries ({exc}). Install "
                                "them (Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0), or "
                                f"reinstall with {PDF_HINT}.") from exc


def render_html(context: dict[str, Any]) -> str:
    """The report as one HTML string (Jinja2, autoescaped, undefined names are errors)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def write_pdf(html: str, path: Path, weasyprint: Any) -> Path:
    """Write ``html`` as a PDF to ``path`` atomically with WeasyPrint (``@page`` rules in report.css)."""
    with io.atomic_path(path) as tmp:
        weasyprint.HTML(string=html, base_url=str(TEMPLATES)).write_pdf(str(tmp))
    return path


def scrub(text: str, private: Sequence[str]) -> str:
    """``text`` with each absolute path in ``private`` replaced by its last component (longest first).

    Embedded ``data:`` URIs are left alone: base64 text can contain ``/root`` by chance.
    """
    ordered = sorted({p for p in private if p and len(p) > 1}, key=len, reverse=True)
    parts = _DATA_URI.split(text)
    for i in range(0, len(parts), 2):  # even items: text between data URIs (the split keeps the URIs)
        for p in ordered:
            parts[i] = parts[i].replace(p, Path(p).name or "folder")
    return "".join(parts)


def _private_paths(files: RunFiles) -> list[str]:
    """Absolute paths that must not appear in a report: run and data folders, config paths, home."""
    paths = [str(files.run_dir.resolve()), os.path.abspath(files.run_dir), str(Path.home())]
    if files.manifest is not None:
        paths.append(str(files.manifest.data_dir))
    for section in files.config.values():
        if isinstance(section, dict):
            paths += [v for v in section.values() if isinstance(v, str) and os.path.isabs(v)]
    return [p for p in paths if p not in ("/", "")]
