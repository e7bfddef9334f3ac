"""``export``: a trained run as TorchScript, ONNX and a MONAI bundle, each with a sidecar ``model.json``.

Every exported graph is :class:`CalibratedModel`: the run's classifier, its logits divided by the card's
temperature, then a sigmoid (binary, multi-label) or a softmax (multi-class). Its output is therefore exactly
what :meth:`medtransfer.run_dir.Run.predict` reports as ``p_<class>`` (calibrated probabilities, one column per
scored class: binary scores ``classes[1]`` only), and a consumer needs nothing but the operating points in the
sidecar to make the same decisions (``p >= threshold``). The input is what :meth:`Run.preprocess` returns:
float32 (N, C, H, W) or (N, C, D, H, W) normalised with the card's mean/std; the batch axis is dynamic.

Layout written under ``out`` (default ``<run>/export``)::

    torchscript/model.ts  torchscript/model.json
    onnx/model.onnx       onnx/model.json
    bundle/               configs/metadata.json, configs/inference.json, models/model.ts, docs/README.md,
                          scripts/ (see :mod:`medtransfer.deploy.bundle`)

Each export is checked before it is kept: the exported model is run (``torch.jit.load`` / onnxruntime) on a
seeded input at two batch sizes and compared with the PyTorch model; more than :data:`TOLERANCE` apart and the
export is refused. The measured difference is recorded in the sidecar (``verified``).

Why tracing and not scripting, and why opset 18: docs/decisions.md ("Export").
"""

from __future__ import annotations

import contextlib
import fcntl
import io as _io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtransfer import io
from medtransfer._optional import require
from medtransfer._version import __version__
from medtransfer.digest import sha256_file
from medtransfer.errors import ExportError, RunDirError
from medtransfer.models.card import ModelCard
from medtransfer.models.outputs import DEFAULT_THRESHOLD, scored_classes
from medtransfer.models.weights_io import CARD_FILE, MODEL_FILE
from medtransfer.run_dir import Run, load_run

logger = logging.getLogger(__name__)

#: Export formats, in the order they are written.
FORMATS = ("torchscript", "onnx", "bundle")
#: ONNX opset of the exported graphs: supported by onnxruntime >= 1.14, TensorRT >= 8.6 and OpenVINO >= 2023.0.
ONNX_OPSET = 18
#: Names of the graph's input and output (ONNX and the sidecar).
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
#: Largest accepted difference between an exported model's probabilities and PyTorch's (float32).
TOLERANCE = 1e-4
#: Batch sizes every export is checked at (two, so that a batch size baked into the graph is caught).
CHECK_BATCHES = (1, 3)
SIDECAR = "model.json"
OUTPUT_MEANING = {
    "binary": "calibrated probability of the positive class, sigmoid(logit / temperature) (one column: classes[1])",
    "multiclass": "calibrated class probabilities, softmax(logits / temperature) over the classes (rows sum to 1)",
    "multilabel": "calibrated probability of each label, sigmoid(logit / temperature) per label (independent)",
}


class CalibratedModel(nn.Module):
    """A run's classifier that outputs calibrated probabilities: what gets exported.

    ``forward(x)``: images (N, C, H, W) or volumes (N, C, D, H, W), normalised as ``card.input`` says →
    float32 (N, len(scored_classes)): ``sigmoid(logits / T)`` (binary, multi-label) or ``softmax(logits / T)``
    (multi-class), T the card's temperature (1 when it has none): ``Run.predict``'s ``p_<class>`` columns.

    A 2.5D (``slices``) model encodes all N * D slices in one backbone call instead of its chunks of
    :data:`~medtransfer.models.volumes.SLICE_CHUNK`: the chunk loop's trip count depends on N, which a traced
    graph would freeze. Each slice is encoded independently in eval mode, so the result is the same (memory
    then grows with N * D: feed large volumes one at a time).
    """

    def __init__(self, model: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.model = model
        self.task = card.task
        self.temperature = float(card.temperature) if card.temperature is not None else 1.0
        self.slices = getattr(model, "volume", None) == "slices"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (N, K) for ``x``."""
        if not self.slices:
            return self.model(x)
        n, d = x.shape[0], x.shape[2]
        inputs = self.model.slice_inputs(x)  # (N, D, C', H, W)
        features = self.model.encode_slices(inputs.reshape((-1, *inputs.shape[2:])))
        return self.model.head(features.reshape(n, d, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x) / self.temperature
        return torch.softmax(z, dim=1) if self.task == "multiclass" else torch.sigmoid(z)


def export(run: Run | str | os.PathLike[str], formats: Iterable[str] = FORMATS, *,
           out: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Export a trained run as TorchScript, ONNX and/or a MONAI bundle, each with a sidecar JSON.

    Args:
        run: a :class:`~medtransfer.run_dir.Run` or its directory. A directory is checked first: a run whose
            training did not finish (no ``model_card.json`` or ``model.safetensors``; checkpoints only) or that
            a training process still holds is refused, saying what is missing and what to do.
        formats: any of ``torchscript``, ``onnx``, ``bundle``.
        out: output folder (default ``<run>/export``); each format gets a sub-folder of that name.

    Returns:
        format → what was written: ``torchscript/model.ts``, ``onnx/model.onnx``, the ``bundle`` folder (its
        sidecars: ``model.json`` beside the model files, ``configs/metadata.json`` in the bundle).

    Raises:
        RunDirError: an incomplete, interrupted or busy run directory.
        ExportError: an unknown format, a model that cannot be exported, or an export whose probabilities differ
            from the run's by more than :data:`TOLERANCE`.
        MissingDependency: ONNX export without ``onnx``/``onnxruntime`` (``pip install "medtransfer[export]"``).

    Examples:
        >>> paths = export("runs/cxr1", ("onnx",))  # doctest: +SKIP
        >>> import onnxruntime as ort  # doctest: +SKIP
        >>> ort.InferenceSession(paths["onnx"]).run(None, {"image": run.preprocess(files).numpy()})  # doctest: +SKIP
    """
    wanted = _formats(formats)
    if not isinstance(run, Run):
        check_run_dir(run)
        run = load_run(run)
    else:
        check_run_dir(run.path, check_lock=False)
    dest = Path(out) if out is not None else run.path / "export"
    model = CalibratedModel(run.model.eval().cpu(), run.card).eval()
    example = example_input(run.card, CHECK_BATCHES[-1])
    written: dict[str, Path] = {}
    traced: torch.jit.ScriptModule | None = None
    if "torchscript" in wanted or "bundle" in wanted:
        traced, ts_diff = _trace(model, example)
    if "torchscript" in wanted:
        assert traced is not None
        path = dest / "torchscript" / "model.ts"
        with io.atomic_path(path) as tmp, _quiet_export():
            torch.jit.save(traced, str(tmp))
        _write_sidecar(path, sidecar(run, "torchscript", path, verified=ts_diff))
        written["torchscript"] = path
    if "onnx" in wanted:
        path = dest / "onnx" / "model.onnx"
        exporter, onnx_diff = _export_onnx(model, example, path)
        _write_sidecar(path, sidecar(run, "onnx", path, verified=onnx_diff, extra={"opset": ONNX_OPSET,
                                                                                 "exporter": exporter}))
        written["onnx"] = path
    if "bundle" in wanted:
        from medtransfer.deploy.bundle import write_bundle

        assert traced is not None
        written["bundle"] = write_bundle(run, traced, dest / "bundle", sidecar=sidecar(
            run, "bundle", None, verified=ts_diff))
    for fmt, path in written.items():
        logger.info("exported %s: %s", fmt, path)
    return written


def _formats(formats: Iterable[str]) -> list[str]:
    items = [formats] if isinstance(formats, str) else list(formats)
    names = [s.strip().lower() for f in items for s in str(f).split(",") if s.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise ExportError(f"unknown export format(s) {unknown or names}; choose from {', '.join(FORMATS)} "
                          "(comma-separated, e.g. --format torchscript,onnx)")
    return [f for f in FORMATS if f in names]


def check_run_dir(path: str | os.PathLike[str], *, check_lock: bool = True) -> None:
    """Refuse a run directory that does not hold a finished model.

    Raises:
        RunDirError: not a directory; training interrupted (checkpoints but no final model); ``model_card.json``
            or ``model.safetensors`` missing; or a training process still holds the run's lock.
    """
    p = Path(path)
    if not p.is_dir():
        raise RunDirError(f"{p}: not a run directory. Give the folder written by 'medtransfer train' (its --out).")
    missing = [name for name in (MODEL_FILE, CARD_FILE) if not (p / name).is_file()]
    if missing:
        interrupted = (p / "checkpoints" / "last" / "training_state.json").is_file()
        why = ("training was interrupted before the final model was saved (only checkpoints/ are there); finish it "
               f"with 'medtransfer train --resume --out {p}', then export" if interrupted else
               "it is not a finished run; export the folder written by a completed 'medtransfer train'")
        raise RunDirError(f"{p}: cannot export: {' and '.join(missing)} missing — {why}.")
    if check_lock and _locked(p / ".lock"):
        raise RunDirError(f"{p}: a training process is still writing this run (lock file {p / '.lock'}); "
                          "export it when training has finished.")


def _locked(lock: Path) -> bool:
    """Whether another process holds ``lock`` (training's exclusive fcntl lock); False when there is none."""
    if not lock.is_file():
        return False
    with open(lock, "rb") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def example_input(card: ModelCard, batch: int, *, seed: int = 0) -> torch.Tensor:
    """A seeded float32 input (batch, C, *size) in the normalised range of ``card.input``: pixels uniform in
    [0, 1], normalised with its mean/std (what real inputs look like to the model, without any scan)."""
    spec = card.input
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, spec.channels, *spec.size), generator=g)
    shape = (1, spec.channels) + (1,) * len(spec.size)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(shape)
    std = torch.tensor(spec.std, dtype=torch.float32).view(shape)
    return (x - mean) / std


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the tracer's and exporters' warnings (shape arithmetic frozen for the fixed input size, which the
    checks against PyTorch cover) and the dynamo exporter's progress lines on stdout."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _trace(model: CalibratedModel, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, float]:
    """``torch.jit.trace`` of ``model`` (see docs/decisions.md for why not ``script``), checked after a save/load
    round trip at every batch size of :data:`CHECK_BATCHES`; returns it and the largest difference."""
    try:
        with _quiet_export(), torch.no_grad():
            traced = torch.jit.trace(model, example[:2], check_trace=False)
    except Exception as exc:  # noqa: BLE001 - any tracer failure becomes one message
        raise ExportError(f"TorchScript export failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          "export with --format onnx instead, or report the backbone") from exc
    buffer = _io.BytesIO()
    with _quiet_export():  # torch >= 2.9 marks torch.jit deprecated; why TorchScript still: docs/decisions.md
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).numpy()

    return traced, _check("TorchScript", model, run, example)


def _export_onnx(model: CalibratedModel, example: torch.Tensor, path: Path) -> tuple[str, float]:
    """ONNX with a dynamic batch axis at :data:`ONNX_OPSET`: the dynamo exporter, else the TorchScript-based one
    (logged and recorded in the sidecar); checked with onnxruntime. Returns (exporter, largest difference)."""
    require("onnx", extra="export", purpose="ONNX export")
    ort = require("onnxruntime", extra="export", purpose="checking the ONNX export")
    errors = []
    for dynamo in (True, False):
        exporter = "dynamo" if dynamo else "torchscript"
        try:
            with io.atomic_path(path) as tmp:
                _onnx_export(model, example[:2], tmp, dynamo=dynamo)
                session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

                def run(x: torch.Tensor, session: Any = session) -> np.ndarray:
                    return session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]

                diff = _check("ONNX", model, run, example)
        except Exception as exc:  # noqa: BLE001 - a failed or inexact export: try the other exporter, report both
            errors.append(f"{exporter} exporter: {type(exc).__name__}: {str(exc)[:300]}")
            if dynamo:
                logger.warning("the dynamo ONNX exporter failed (%s); trying the TorchScript-based exporter "
                               "(dynamo=False)", errors[-1])
            continue
        return exporter if dynamo else "torchscript (dynamo failed: " + errors[0][:200] + ")", diff
    raise ExportError(f"ONNX export failed with both exporters ({'; '.join(errors)}); use --format torchscript")


def _onnx_export(model: nn.Module, example: torch.Tensor, path: Path, *, dynamo: bool) -> None:
    kw: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": ONNX_OPSET,
                          "dynamo": dynamo}
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        kw["external_data"] = False
    else:
        kw["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with _quiet_export(), torch.no_grad():
        torch.onnx.export(model, (example,), str(path), **kw)


def _check(what: str, model: nn.Module, run: Any, example: torch.Tensor) -> float:
    """Largest |exported - PyTorch| over :data:`CHECK_BATCHES`; :class:`ExportError` beyond :data:`TOLERANCE`."""
    worst = 0.0
    for n in CHECK_BATCHES:
        x = example[:n]
        got, want = np.asarray(run(x)), _reference(model, x)
        if got.shape != want.shape:
            raise ExportError(f"the {what} export gives shape {got.shape} for a batch of {n}, PyTorch {want.shape}")
        worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
    if not worst <= TOLERANCE:
        raise ExportError(f"the {what} export's probabilities differ from the run's by {worst:.3g} "
                          f"(> {TOLERANCE:g}); not written. Report the backbone; other formats may work.")
    return worst


def sidecar(run: Run, fmt: str, path: Path | None, *, verified: float,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a consumer needs beside the model file: classes, operating points, preprocessing, output meaning.

    Args:
        run: the exported run.
        fmt: ``torchscript``, ``onnx`` or ``bundle``.
        path: the model file (its SHA-256 is recorded), or None.
        verified: the largest difference measured against PyTorch.
        extra: format-specific entries (ONNX: ``opset``, ``exporter``).
    """
    card = run.card
    spec = card.input
    classes = scored_classes(card)
    thresholds = {c: float(card.thresholds.get(c, DEFAULT_THRESHOLD)) for c in classes}
    layout = "N, C, D, H, W" if spec.spatial_dims == 3 else "N, C, H, W"
    out: dict[str, Any] = {
        "format": fmt,
        "file": path.name if path is not None else "models/model.ts",
        "sha256": sha256_file(path, memoise=False) if path is not None else None,
        "name": card.name,
        "task": card.task,
        "classes": list(card.classes),
        "backbone": card.backbone,
        "volume": card.volume,
        "slice_context": card.slice_context,
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": layout,
            "shape": ["batch", spec.channels, *spec.size],
            "preprocessing": _preprocessing_text(card),
        },
        "input_spec": spec.model_dump(mode="json"),
        "output": {
            "name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(classes)], "columns": classes,
            "meaning": OUTPUT_MEANING[card.task],
            "decision": "a class is positive when its probability >= its threshold"
                        + (" (multiclass: the predicted class is the arg-max)" if card.task == "multiclass" else ""),
        },
        "thresholds": thresholds,
        "thresholds_source": {c: "card" if c in card.thresholds else f"default {DEFAULT_THRESHOLD}" for c in classes},
        "temperature": card.temperature,
        "calibrated": card.temperature is not None,
        "model_card_sha256": sha256_file(run.path / CARD_FILE, memoise=False),
        "weights_sha256": sha256_file(run.path / MODEL_FILE, memoise=False),
        "medtransfer_version": __version__,
        "torch_version": torch.__version__,
        "verified": {"max_abs_diff": verified, "tolerance": TOLERANCE, "batch_sizes": list(CHECK_BATCHES),
                     "against": "the run's PyTorch model (float32, CPU) on a seeded input"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": "research; NOT FOR CLINICAL USE",
    }
    out.update(extra or {})
    return out


def _preprocessing_text(card: ModelCard) -> str:
    spec = card.input
    if spec.spatial_dims == 3:
        geometry = (f"reoriented to {spec.orientation} in the (D, H, W) layout (slices inferior to superior, rows "
                    "anterior to posterior, columns patient's right to left for RAS)"
                    + (f", resampled to {list(spec.spacing)} mm" if spec.spacing else "") + ", ")
    else:
        geometry = ""
    intensity = (f"CT windows {list(spec.windows)} (one channel each)" if spec.windows else
                 f"intensity window '{spec.window}' to [0, 1]"
                 + (" (DICOM VOI from the file, MONOCHROME1 inverted)" if spec.window == "file" else ""))
    return (f"medtransfer Run.preprocess: decode, {geometry}{intensity}, resize to {list(spec.size)}"
            f"{' keeping the aspect (zero padding)' if spec.keep_aspect else ''}, {spec.channels} channel(s), "
            f"(x - mean) / std with mean={list(spec.mean)} std={list(spec.std)}")


def _write_sidecar(model_path: Path, data: dict[str, Any]) -> Path:
    return io.write_json(model_path.parent / SIDECAR, data)
