"""``run_demo``: the whole pipeline, offline, on the bundled synthetic scans (``medtransfer demo``).

sample data (DICOM, 3 sites) -> index -> train (EfficientNet-Lite0, ImageNet weights shipped in a package,
gradual unfreezing) -> evaluate (CIs, calibration, subgroups by sex / age band / site) -> explain (Grad-CAM
for the gallery; occlusion on the most confident errors, which is what finds a burned-in marker) -> shortcut
audit (site probe, leave-one-site-out, prevalence by site) -> report.

The sample data plant a weak site and a marker shortcut (``sample_data/README.md``), so the report has
something real to find; the summary says whether it was found rather than assuming it.

Re-running is cheap and safe: stages whose outputs are complete are reused (the run is keyed by the demo's
settings in ``demo.json``), an interrupted training resumes from its last checkpoint, and a folder that the
demo did not make is never deleted.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtransfer import io
from medtransfer.digest import sha256_json
from medtransfer.errors import RunDirError

logger = logging.getLogger(__name__)

#: Settings of the full demo (``configs/demo.yaml``), of ``--fast`` (5 epochs, occlusion on fewer cases), and of
#: the same two for ``--volumes`` (``configs/demo-volumes.yaml``).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"overrides": [], "gradcam_cases": 3, "occlusion_cases": 2},
    "fast": {"overrides": ["train.epochs=5", "train.patience=2"], "gradcam_cases": 2, "occlusion_cases": 1},
    # volumes (configs/demo-volumes.yaml): Grad-CAM on 2 cases per kind, no occlusion: even with only the touched
    # slices re-encoded (13 s a map), its sanity check repeats the map for every randomised stage of the model
    "full-volumes": {"overrides": [], "gradcam_cases": 2, "occlusion_cases": 0},
    "fast-volumes": {"overrides": ["train.epochs=10"], "gradcam_cases": 1, "occlusion_cases": 0},
}
DEMO_FILE = "demo.json"
#: The volume demo's sample data: larger nodules at twice the default in-plane size, and 400 studies: a frozen 2.5D
#: probe with attention-MIL learns the nodules from ~220 training volumes (within-site AUROC 0.72-0.90), while from
#: ~100 it learned only the site-B marker shortcut (within-site 0.47-0.69; docs/decisions.md).
DEMO_VOLUMES: dict[str, Any] = {"n": 400, "size": (32, 128, 128), "nodule_mm": (25.0, 40.0)}


@dataclass
class DemoResult:
    """What the demo produced and found.

    Attributes:
        run_dir: the run directory (model, evaluation, saliency, report).
        data_dir: the synthetic scan folder.
        report: format -> path of the rendered report.
        auroc: test AUROC of the positive class with its CI ``(value, lo, hi)``.
        flagged_gaps: one line per subgroup gap whose CI excludes 0.
        gap_status: the subgroup-gap check when nothing was flagged (passed, or not assessed and why).
        shortcut_hints: method -> (maps with a corner/border/outside-body hint, maps).
        seconds: wall time per stage.
        site_probe: (balanced accuracy, chance) of predicting the site from the model's features.
        warnings: anything that did not go as planned (e.g. PDF unavailable).
    """

    run_dir: Path
    data_dir: Path
    report: dict[str, Path] = field(default_factory=dict)
    auroc: tuple[float, float, float] = (float("nan"), float("nan"), float("nan"))
    flagged_gaps: list[str] = field(default_factory=list)
    shortcut_hints: dict[str, tuple[int, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    site_probe: tuple[float, float] | None = None
    gap_status: str = "subgroup gaps not assessed"

    def summary(self) -> str:
        """A few lines for the terminal: headline, what was flagged, where the report is."""
        a, lo, hi = self.auroc
        lines = [f"test AUROC {a:.3f} (95% CI {lo:.3f}-{hi:.3f})"]
        lines += [f"flagged gap: {g}" for g in self.flagged_gaps] or [self.gap_status]
        for method, (hinted, total) in self.shortcut_hints.items():
            lines.append(f"{method}: {hinted} of {total} heat maps concentrate on corners/borders (shortcut hint)")
        if self.site_probe is not None:
            lines.append(f"site probe: the model's features tell the sites apart with balanced accuracy "
                         f"{self.site_probe[0]:.2f} (chance {self.site_probe[1]:.2f})")
        lines += [f"warning: {w}" for w in self.warnings]
        total = sum(self.seconds.values())
        lines.append(f"done in {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) + ")")
        lines += [f"report: {p}" for p in self.report.values()]
        return "\n".join(lines)


def run_demo(
    out: str | Path | None = None,
    *,
    fast: bool = False,
    data_dir: str | Path | None = None,
    formats: tuple[str, ...] = ("html", "pdf"),
    progress: bool = False,
    volumes: bool = False,
) -> DemoResult:
    """Run the whole pipeline on the bundled synthetic scans, offline, and render the report.

    Args:
        out: run directory for the demo (re-used when its settings match; see the module docstring); default
            ``runs/demo`` (``runs/demo-volumes`` with ``volumes``).
        fast: fewer epochs and fewer occlusion maps (about half the time).
        data_dir: where the sample scans are (generated there if missing or made with other settings); default
            ``sample_data/generated`` (``sample_data/volumes``).
        volumes: the volume pipeline instead: synthetic chest CT series from three simulated scanners
            (``sample-data --volumes``: lung nodules, a metal-marker shortcut at one site), read as DICOM
            series, a 2.5D linear probe on ImageNet weights (``configs/demo-volumes.yaml``), Grad-CAM montages
            with the slice-attention curve (no occlusion: minutes per volume for a 2.5D model on a CPU). Its model finds the planted nodules only
            moderately (test AUROC about 0.7; see the preset).
        formats: report formats; without WeasyPrint the HTML is still written and a warning says so.
        progress: progress bars on stderr.

    Returns:
        :class:`DemoResult` (print ``result.summary()``).

    Raises:
        RunDirError: ``out`` is a non-empty folder that the demo did not make.
    """
    from medtransfer.audit.shortcuts import audit_shortcuts
    from medtransfer.datasets.synthetic import generate_sample_data, generate_sample_volumes
    from medtransfer.evaluation.evaluate import evaluate
    from medtransfer.evaluation.result import EvaluationResult
    from medtransfer.explain.run import explain_run
    from medtransfer.reports.render import PdfUnavailable, render_report
    from medtransfer.training.run import train

    mode = ("fast" if fast else "full") + ("-volumes" if volumes else "")
    settings = DEMO_SETTINGS[mode]
    preset = "demo-volumes" if volumes else "demo"
    run_dir = Path(out if out is not None else "runs/demo-volumes" if volumes else "runs/demo")
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    if volumes:
        data = generate_sample_volumes(data_dir if data_dir is not None else "sample_data/volumes", **DEMO_VOLUMES)
    else:
        data = generate_sample_data(data_dir if data_dir is not None else "sample_data/generated")
    seconds["sample data"] = time.perf_counter() - t

    key = _settings_key(mode, data, preset)
    state = _prepare_out(run_dir, key)
    t = time.perf_counter()
    if state != "trained":
        train(data, labels=data / "labels.csv", config=preset, overrides=settings["overrides"], out=run_dir,
              resume=state == "resume", progress=progress)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    if (run_dir / "evaluation.json").is_file():
        result = EvaluationResult.load(run_dir)
    else:
        result = evaluate(run_dir, subgroups=("sex", "age_band", "site"), progress=progress)
    seconds["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    explain_run(run_dir, method="gradcam", cases=settings["gradcam_cases"], progress=progress)
    # Grad-CAM is coarse (4 x 4 cells at 128 px) and misses a small burned-in marker; occlusion on the most
    # confident errors is what shows a model reading the corner.
    if settings["occlusion_cases"]:
        explain_run(run_dir, method="occlusion", cases=settings["occlusion_cases"], progress=progress)
    seconds["explain"] = time.perf_counter() - t

    t = time.perf_counter()
    if not (run_dir / "audit" / "shortcuts.json").is_file():
        audit_shortcuts(run_dir, progress=progress)
    seconds["shortcut audit"] = time.perf_counter() - t

    demo = DemoResult(run_dir=run_dir, data_dir=data, seconds=seconds)
    t = time.perf_counter()
    try:
        demo.report = render_report(run_dir, formats=formats)
    except PdfUnavailable as exc:
        demo.report = dict(exc.outputs)
        demo.warnings.append(f"PDF not written: {exc}")
    seconds["report"] = time.perf_counter() - t
    _fill_findings(demo, result)
    audit = run_dir / "audit" / "shortcuts.json"
    if audit.is_file():
        probe = [r for r in io.read_json(audit).get("probe", []) if r.get("attribute") == "site"]
        if probe and probe[0].get("balanced_accuracy") is not None:
            demo.site_probe = (float(probe[0]["balanced_accuracy"]), float(probe[0]["chance"]))
    return demo


def _settings_key(mode: str, data: Path, name: str = "demo") -> str:
    """Fingerprint of what the demo run depends on: mode, demo preset, sample-data fingerprint."""
    from medtransfer.config import resolve_config_path

    preset = resolve_config_path(name)
    return sha256_json({"mode": mode, "settings": DEMO_SETTINGS[mode],
                        "preset": preset.read_text(encoding="utf-8") if preset else "",
                        "data": (data / ".complete").read_text(encoding="utf-8").strip()}, 16)


def _prepare_out(run_dir: Path, key: str) -> str:
    """'new', 'resume' or 'trained'; clears a stale demo run (never a folder the demo did not make)."""
    marker = run_dir / DEMO_FILE
    if run_dir.exists() and any(run_dir.iterdir()):
        if not marker.is_file():
            raise RunDirError(f"{run_dir} is not empty and was not made by 'medtransfer demo'; "
                              "choose another --out or remove it")
        if io.read_json(marker).get("key") == key:
            if (run_dir / "model_card.json").is_file():
                return "trained"
            if (run_dir / "config.yaml").is_file():
                return "resume"
        logger.info("%s holds a demo run made with other settings; starting again", run_dir)
        shutil.rmtree(run_dir)
    io.write_json(marker, {"key": key, "made_by": "medtransfer demo"})
    return "new"


def _fill_findings(demo: DemoResult, result: Any) -> None:
    import pandas as pd

    row = result.overall.iloc[0]
    demo.auroc = (float(row["auroc"]), float(row["auroc_lo"]), float(row["auroc_hi"]))
    gaps = result.gaps
    if "flagged" in gaps:
        for g in gaps[gaps["flagged"].astype(bool)].to_dict("records"):
            name = "AUROC" if g["metric"] == "auroc" else g["metric"]
            demo.flagged_gaps.append(f"{g['attribute']} {name} gap {g['gap']:.2f} "
                                     f"(CI {g['gap_lo']:.2f}-{g['gap_hi']:.2f}), worst: {g['worst_group']}")
    check = next((c for c in result.meta.get("checks", []) if c["key"] == "subgroup_gaps"), None)
    if check is not None:
        demo.gap_status = f"{check['status']}: {check['title']} ({check['detail']})"
    index_path = demo.run_dir / "saliency" / "index.csv"
    if index_path.is_file():
        index = pd.read_csv(index_path, dtype={"hint": str})
        for method, rows in index.groupby("method", sort=False):
            hinted = rows["hint"].fillna("").str.len().gt(0)
            demo.shortcut_hints[str(method)] = (int(hinted.sum()), len(rows))
