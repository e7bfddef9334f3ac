"""Report figures: matplotlib (Agg, object API, no pyplot state) rendered to base64 PNG data URIs.

Every figure comes back as a :class:`Figure` with its data URI and an ``alt`` text that states the numbers
a sighted reader would take from it, so the HTML stays one self-contained, accessible file. Nothing here
imports torch; curves are computed with scikit-learn from ``predictions.csv`` columns.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

BLUE, ORANGE, GREEN, VERMILLION, GREY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#777777"
DPI = 110


@dataclass(frozen=True)
class Figure:
    """One embedded figure: ``uri`` (``data:image/png;base64,...``), ``alt`` text and a short caption."""

    uri: str
    alt: str
    caption: str = ""


def _new(width: float, height: float, ncols: int = 1) -> tuple[MplFigure, list]:
    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, list(axes)


def to_data_uri(fig: MplFigure) -> str:
    """PNG bytes of ``fig`` as a ``data:`` URI (the figure is not kept)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_uri(data: bytes) -> str:
    """A ``data:`` URI for PNG bytes read from disk (saliency overlays)."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def history_figure(history: pd.DataFrame, best_epoch: int | None = None) -> Figure | None:
    """Training and validation loss, and validation AUROC, per epoch (``history.csv``); None when empty."""
    if history is None or history.empty or "epoch" not in history.columns:
        return None
    fig, (ax1, ax2) = _new(8.0, 2.8, 2)
    ep = history["epoch"].to_numpy()
    for col, colour, label in (("train_loss", BLUE, "training loss"), ("val_loss", ORANGE, "validation loss")):
        if col in history.columns:
            ax1.plot(ep, history[col], marker="o", ms=3, color=colour, label=label)
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend(frameon=False, fontsize=8)
    if "val_auroc" in history.columns:
        ax2.plot(ep, history["val_auroc"], marker="o", ms=3, color=GREEN, label="validation AUROC")
    ax2.set(xlabel="epoch", ylabel="AUROC", title="Validation AUROC", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best_epoch is not None:
        for ax in (ax1, ax2):
            ax.axvline(best_epoch, color=GREY, linestyle="--", linewidth=1)
        ax2.annotate(f"best epoch {best_epoch}", (best_epoch, 0.05), fontsize=8, color="#333333")
    last = history.iloc[-1]
    alt = (f"Line charts of loss and validation AUROC over {len(history)} epochs. Final training loss "
           f"{_f(last.get('train_loss'))}, validation loss {_f(last.get('val_loss'))}; best validation AUROC "
           f"{_f(history['val_auroc'].max() if 'val_auroc' in history else None)}"
           + (f" at epoch {best_epoch}." if best_epoch is not None else "."))
    return Figure(to_data_uri(fig), alt, "Training curves; the dashed line marks the epoch whose weights were kept.")


def roc_pr_figure(y: np.ndarray, p: np.ndarray, cls: str, *, sensitivity: float | None,
                  specificity: float | None, ppv: float | None, threshold: float | None) -> Figure | None:
    """ROC and precision-recall curves of one class with the stored operating point marked.

    Args:
        y: 0/1 truth (N,); rows with NaN in ``y`` or ``p`` are dropped.
        p: calibrated probabilities (N,) in [0, 1].
        cls: class name (titles).
        sensitivity, specificity, ppv: the operating point (from ``per_class``).
        threshold: the decision threshold (legend).
    """
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    ok = np.isfinite(y) & np.isfinite(p)
    y, p = y[ok].astype(int), p[ok]
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    fig, (ax1, ax2) = _new(8.0, 3.4, 2)
    ax1.plot(fpr, tpr, color=BLUE, label=f"ROC (AUC {auc(fpr, tpr):.3f})")
    ax1.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="chance")
    ax1.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity", title=f"ROC: {cls}",
            xlim=(0, 1), ylim=(0, 1.02))
    ax2.plot(rec, prec, color=BLUE, label="precision-recall")
    ax2.axhline(y.mean(), color=GREY, linestyle=":", linewidth=1, label=f"prevalence {y.mean():.2f}")
    ax2.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title=f"Precision-recall: {cls}",
            xlim=(0, 1), ylim=(0, 1.02))
    op = f"operating point (threshold {threshold:.2f})" if _ok(threshold) else "operating point"
    if _ok(sensitivity) and _ok(specificity):
        ax1.plot(1 - specificity, sensitivity, "D", color=VERMILLION, ms=7, label=op)
    if _ok(sensitivity) and _ok(ppv):
        ax2.plot(sensitivity, ppv, "D", color=VERMILLION, ms=7, label=op)
    for ax in (ax1, ax2):
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    alt = (f"ROC and precision-recall curves for {cls} on {len(y)} cases ({int(y.sum())} positive). "
           f"ROC area {auc(fpr, tpr):.3f}. Operating point marked at sensitivity {_f(sensitivity)}, "
           f"specificity {_f(specificity)}, PPV {_f(ppv)}.")
    return Figure(to_data_uri(fig), alt, f"{cls}: ROC (left) and precision-recall (right); the diamond is the "
                  "decision threshold the model uses.")


def reliability_figure(bins: pd.DataFrame, cls: str, *, ece: float | None,
                       ece_uncalibrated: float | None) -> Figure | None:
    """Reliability diagram (observed vs predicted per bin) before and after temperature scaling."""
    if bins is None or bins.empty:
        return None
    fig, (ax,) = _new(4.4, 3.6)
    ax.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="perfect calibration")
    styles = {"uncalibrated": (ORANGE, "s", f"before scaling (ECE {_f(ece_uncalibrated)})"),
              "calibrated": (BLUE, "o", f"after temperature scaling (ECE {_f(ece)})")}
    for stage, (colour, marker, label) in styles.items():
        part = bins[(bins["stage"] == stage) & (bins["count"] > 0)].dropna(subset=["mean_predicted"])
        if len(part):
            ax.plot(part["mean_predicted"], part["fraction_positive"], marker=marker, color=colour, label=label)
    ax.set(xlabel="predicted probability", ylabel="observed fraction positive", title=f"Calibration: {cls}",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    alt = (f"Reliability diagram for {cls}: observed frequency against predicted probability in bins. "
           f"Expected calibration error {_f(ece_uncalibrated)} before and {_f(ece)} after temperature scaling.")
    return Figure(to_data_uri(fig), alt, f"{cls}: points on the dotted diagonal mean a probability of x% comes "
                  "true x% of the time.")


def forest_figure(rows: pd.DataFrame, cls: str, metrics: Sequence[str] = ("auroc", "sensitivity"),
                  overall: dict[str, float] | None = None) -> Figure | None:
    """Forest plot: per subgroup, each metric with its CI; insufficient groups marked "not assessed".

    Args:
        rows: ``by_group`` rows of one class (attribute, group, n, status, metric, metric_lo, metric_hi).
        cls: class name (title).
        metrics: metrics to draw, one panel each.
        overall: metric -> overall value (dashed vertical reference line).
    """
    if rows is None or rows.empty:
        return None
    labels = [f"{a}={g} (n={n})" for a, g, n in zip(rows["attribute"], rows["group"], rows["n"], strict=True)]
    ypos = np.arange(len(rows))[::-1]
    fig = MplFigure(figsize=(8.6, 1.1 + 0.3 * len(rows)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    ok = (rows["status"] == "ok").to_numpy()
    for ax, metric in zip(axes, metrics, strict=True):
        v, lo, hi = (rows[c].to_numpy(dtype=float) for c in (metric, f"{metric}_lo", f"{metric}_hi"))
        good = ok & np.isfinite(v)
        err = np.nan_to_num(np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)]))
        ax.grid(True, axis="x", color="#dddddd", linewidth=0.6)
        ax.errorbar(v[good], ypos[good], xerr=err[:, good], fmt="o", color=BLUE, ecolor=BLUE, capsize=3, ms=4)
        for y in ypos[~good]:
            ax.text(0.02, y, "not assessed (too few patients)", color=GREY, fontsize=7, va="center")
        if overall and _ok(overall.get(metric)):
            ax.axvline(overall[metric], color=VERMILLION, linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1.02), ylim=(-0.7, len(rows) - 0.3), xlabel=metric.upper() if metric == "auroc" else metric)
        ax.set_title(metric.upper() if metric == "auroc" else metric.capitalize(), fontsize=10)
    axes[0].set_yticks(ypos, labels, fontsize=8)
    fig.suptitle(f"Subgroups: {cls} (dashed line: all test cases)", fontsize=10)
    assessed = int(ok.sum())
    alt = (f"Forest plot for {cls}: {', '.join(metrics)} with confidence intervals for {len(rows)} subgroups; "
           f"{assessed} had enough patients to be assessed, {len(rows) - assessed} are marked not assessed.")
    return Figure(to_data_uri(fig), alt, "Dots: point estimate; bars: confidence interval; dashed line: all "
                  "test cases together.")


# -- explainability gallery ------------------------------------------------------------------------------
#: Overlays embedded at most (the HTML stays small enough to e-mail); the rest are counted, not shown.
MAX_GALLERY = 24
KIND_ORDER = {"TP": 0, "FP": 1, "FN": 2, "TN": 3}
KIND_TEXT = {"TP": "true positive", "FP": "false positive", "FN": "false negative", "TN": "true negative"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


STRATEGY_COLOURS = {"scratch": GREY, "linear-probe": BLUE, "gradual": ORANGE, "fine-tune": GREEN}


def learning_curve_figure(curve: pd.DataFrame) -> Figure | None:
    """Test AUROC vs training fraction per strategy (mean over seeds, band = mean bootstrap CI)."""
    if curve is None or curve.empty:
        return None
    fig, (ax,) = _new(6.0, 3.2)
    alts = []
    # other starting points ("linear-probe@ssl"): the strategy's colour, a line style and marker per source
    sources = sorted({str(s).partition("@")[2] for s in curve["strategy"]} - {""})
    styles = {src: (ls, mk) for src, ls, mk in zip(sources, [":", "-.", (0, (5, 1, 1, 1)), (0, (1, 1))] * 4,
                                                     ["s", "^", "D", "v"] * 4, strict=False)}
    for strategy, rows in curve.groupby("strategy", sort=False):
        rows = rows.sort_values("fraction")
        base, _, source = str(strategy).partition("@")
        colour = STRATEGY_COLOURS.get(base, VERMILLION)
        x = rows["fraction"].to_numpy(float) * 100
        linestyle, marker = styles.get(source, ("--" if strategy == "scratch" else "-", "o"))
        ax.plot(x, rows["test_auroc"], marker=marker, ms=4, color=colour, label=str(strategy), linestyle=linestyle)
        ax.fill_between(x, rows["test_lo"].to_numpy(float), rows["test_hi"].to_numpy(float), color=colour,
                        alpha=0.15, linewidth=0)
        alts.append(f"{strategy}: " + ", ".join(f"{f:g}% {a:.2f}" for f, a in zip(x, rows["test_auroc"], strict=True)))
    ax.set_xscale("log")
    ticks = sorted(curve["fraction"].unique() * 100)
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.set(xlabel="training patients used", ylabel="test AUROC", title="Learning curve: pretrained vs scratch")
    ax.legend(frameon=False, fontsize=8)
    return Figure(to_data_uri(fig), "Test AUROC by fraction of training data. " + "; ".join(alts),
                  "Mean over seeds; shaded: mean 95% bootstrap CI of the cells.")


def shift_figure(shift: dict | None) -> Figure | None:
    """A site against the training data: intensity histograms (first channel) and positive rates per class.

    From ``shift.json`` (``medtransfer adapt``): ``input.intensity[0]`` (``edges``, ``hist_reference``,
    ``hist_site``) and ``output.classes`` (positive rates with CIs at the operating point). None without either.
    """
    if not shift:
        return None
    intensity = (shift.get("input") or {}).get("intensity") or []
    classes = (shift.get("output") or {}).get("classes") or []
    hist = intensity[0] if intensity and {"edges", "hist_reference", "hist_site"} <= set(intensity[0]) else None
    if hist is None and not classes:
        return None
    fig, axes = _new(7.2, 2.8, ncols=2 if hist is not None and classes else 1)
    alts = []
    ax_i = 0
    if hist is not None:
        ax = axes[ax_i]
        ax_i += 1
        edges = np.asarray(hist["edges"], float)
        for key, colour, label in (("hist_reference", BLUE, "training (reference)"), ("hist_site", VERMILLION, "site")):
            ax.stairs(np.asarray(hist[key], float), edges, color=colour, label=label, linewidth=1.4)
        ax.set(xlabel="model input intensity", ylabel="density", title="Intensities")
        ax.legend(frameon=False, fontsize=8)
        alts.append("intensity histograms of the training reference and the site")
    if classes:
        ax = axes[ax_i]
        names = [str(c["class"]) for c in classes]
        y = np.arange(len(names))
        for off, side, colour, label in ((-0.12, "reference", BLUE, "training (reference)"),
                                         (0.12, "site", VERMILLION, "site")):
            rate = np.array([float(c.get(f"positive_rate_{side}", np.nan)) for c in classes])
            lo = np.array([float(c.get(f"positive_rate_{side}_lo", np.nan)) for c in classes])
            hi = np.array([float(c.get(f"positive_rate_{side}_hi", np.nan)) for c in classes])
            ax.errorbar(rate, y + off, xerr=[np.clip(rate - lo, 0, None), np.clip(hi - rate, 0, None)], fmt="o",
                        ms=4, color=colour, label=label, capsize=2)
            alts.append(f"{side} predicted positive: " + ", ".join(f"{n} {r:.0%}" for n, r in zip(names, rate,
                                                                                                  strict=True)))
        ax.set_yticks(y, names)
        ax.set_ylim(len(names) + 0.3, -0.5)  # room for the legend below the last class
        ax.set_xlim(-0.02, 1.02)
        ax.set(xlabel="predicted positive at the operating point", title="Decisions")
        ax.legend(frameon=False, fontsize=8, loc="lower center", ncols=2)
    return Figure(to_data_uri(fig), "Site against training data: " + "; ".join(alts) + ".",
                  "Left: what the model is given; right: share predicted positive with 95% CIs.")


def time_to_target_figure(cells: pd.DataFrame, target: float | None) -> Figure | None:
    """Mean wall seconds to reach the target validation AUROC with all training data, per strategy."""
    if cells is None or cells.empty or "seconds_to_target" not in cells or target is None:
        return None
    full = cells[cells["fraction"] == cells["fraction"].max()]
    means = full.groupby("strategy", sort=False)["seconds_to_target"].mean()
    reached = full.groupby("strategy", sort=False)["seconds_to_target"].apply(lambda s: int(s.notna().sum()))
    seeds = full.groupby("strategy", sort=False).size()
    fig, (ax,) = _new(6.0, 2.4)
    names = list(means.index)
    vals = [0.0 if not np.isfinite(v) else float(v) for v in means.to_numpy(float)]
    ax.barh(names, vals, color=[STRATEGY_COLOURS.get(n, VERMILLION) for n in names])
    for i, n in enumerate(names):
        label = f"{vals[i]:.0f} s ({reached[n]}/{seeds[n]} seeds)" if reached[n] else "not reached"
        ax.text(vals[i], i, " " + label, va="center", fontsize=8)
    ax.set(xlabel=f"seconds to validation AUROC ≥ {target:.3f}", title="Time to target (all training data)")
    ax.invert_yaxis()
    alt = "; ".join(f"{n}: " + (f"{vals[i]:.0f} s" if reached[n] else "not reached") for i, n in enumerate(names))
    return Figure(to_data_uri(fig), f"Seconds to reach validation AUROC {target:.3f}: {alt}", "")


def hint_text(hint: object) -> str:
    """A plain-language reading of an ``index.csv`` ``hint`` (``corner:top_left;border;outside_body``)."""
    if not isinstance(hint, str) or not hint.strip():
        return "none: the heat lies mostly on the body"
    words = []
    for flag in hint.split(";"):
        if flag.startswith("corner:"):
            words.append(f"heat concentrated in the {flag[7:].replace('_', '-')} corner, where side markers and "
                         "burned-in text usually are")
        elif flag == "border":
            words.append("heat on the image border")
        elif flag == "outside_body":
            words.append("heat outside the body")
        else:
            words.append(flag)
    return "; ".join(words)


def gallery(saliency_dir: Path, index: pd.DataFrame | None, sanity: dict[str, pd.DataFrame]) -> dict:
    """The explainability section: overlays (TP/FP/FN per class) embedded as data URIs, with their scores.

    Args:
        saliency_dir: ``<run>/saliency`` (PNG paths in ``index`` are relative to it).
        index: ``saliency/index.csv`` or None when saliency was never computed.
        sanity: method -> ``sanity_<method>.csv`` table.
    """
    if index is None or index.empty:
        return {"present": False}
    index = index.assign(_order=index["kind"].map(KIND_ORDER).fillna(9)).sort_values(["class", "_order", "case_id"])
    classes: dict[str, list[dict]] = {}
    shown = 0
    for r in index.to_dict("records"):
        data = _read_png(saliency_dir, r.get("file"))
        if data is None or shown >= MAX_GALLERY:
            continue
        shown += 1
        kind = str(r.get("kind")) if isinstance(r.get("kind"), str) else ""
        item = {"case_id": str(r["case_id"]), "kind": kind or "requested", "kind_text": KIND_TEXT.get(kind, "requested"),
                "group": r.get("group") if isinstance(r.get("group"), str) else "all", "method": r.get("method"),
                "score": _f2(r.get("score")), "sanity": _f2(r.get("sanity_score")),
                "passed": str(r.get("sanity_passed")).lower() == "true", "deletion": _f2(r.get("deletion_ratio")),
                "hint": hint_text(r.get("hint")), "has_hint": isinstance(r.get("hint"), str) and bool(r["hint"].strip()),
                "uri": png_data_uri(data)}
        item["alt"] = (f"{item['method']} heat map over case {item['case_id']} ({item['kind_text']} for {r['class']}, "
                       f"probability {item['score']}); shortcut hint: {item['hint']}.")
        classes.setdefault(str(r["class"]), []).append(item)
    return {"present": True, "classes": [{"name": k, "items": v} for k, v in classes.items()],
            "n_total": len(index), "n_shown": shown, "methods": sorted(index["method"].dropna().astype(str).unique()),
            "sanity": _sanity_tables(sanity)}


def _read_png(root: Path, rel: object) -> bytes | None:
    """The PNG at ``root / rel`` if it is a PNG inside ``root`` (no ``..`` escapes), else None."""
    if not isinstance(rel, str) or not rel:
        return None
    path = (root / rel).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        return None
    data = path.read_bytes()
    return data if data.startswith(PNG_MAGIC) else None


def _sanity_tables(sanity: dict[str, pd.DataFrame]) -> list[dict]:
    out = []
    for method, t in sanity.items():
        if t.empty:
            continue
        rows = [{"step": r.get("randomised"), "rho": _f2(r.get("mean_spearman")), "sd": _f2(r.get("std_spearman"))}
                for r in t.to_dict("records")]
        last = t.iloc[-1]
        out.append({"method": method, "score": _f2(last.get("sanity_score")),
                    "passed": str(last.get("passed")).lower() == "true", "threshold": _f2(last.get("threshold")),
                    "n_images": last.get("n_images"), "target": last.get("target_class"), "rows": rows})
    return out


def _f2(v: object) -> str:
    return f"{float(v):.2f}" if _ok(v) else "not available"  # type: ignore[arg-type]


def _ok(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def _f(v: float | None) -> str:
    return f"{float(v):.3f}" if _ok(v) else "not available"
