"""``write_bundle``: a run as a MONAI bundle that classifies a folder of scans without medtransfer installed.

The folder follows MONAI's bundle specification::

    configs/metadata.json    version, monai/pytorch/numpy versions, task, network_data_format, and the
                             medtransfer sidecar (classes, operating points, InputSpec, output meaning)
    configs/inference.json   the inference workflow (ConfigWorkflow, workflow_type "infer")
    configs/logging.conf
    models/model.ts          the calibrated TorchScript model (metadata.json and inference.json inside too)
    models/model.json        the same sidecar as the other formats
    docs/README.md
    scripts/medtransfer_steps.py   the steps MONAI has no transform for (numpy, torch and MONAI only)

Run it with ``python -m monai.bundle run --config_file configs/inference.json --workflow_type infer
--bundle_root BUNDLE --dataset_dir SCANS --output_dir OUT``: it writes ``OUT/predictions.csv`` with ``file``,
``p_<class>`` (calibrated probabilities), ``pred_<class>`` (1/0 at the run's operating points) and
``predicted``, as ``medtransfer predict`` does. It needs torch, MONAI, fire (MONAI's command line), and the
reader of the scans (pydicom, Pillow or nibabel), nothing of medtransfer.

The preprocessing is the run's (:class:`~medtransfer.data.spec.InputSpec`) rebuilt with MONAI transforms:
``LoadImaged`` + ``EnsureChannelFirstd``, ``Orientationd`` and ``Spacingd`` for volumes, ``ScaleIntensityRanged``
per CT window (``ConcatItemsd`` stacks several), ``ScaleIntensityRangePercentilesd`` / ``ScaleIntensityd`` /
``ScaleIntensityRanged`` for the percentile / min-max / fixed windows, ``RepeatChanneld`` and
``NormalizeIntensityd``. Four steps have no MONAI transform and live in ``scripts/medtransfer_steps.py``: the
window a DICOM file carries (VOI LUT function, MONOCHROME1 inversion), colour to grey, medtransfer's resize rule
(area averaging when shrinking, linear when enlarging, optional aspect-keeping padding) with the 8/16-bit
quantisation of its image cache, and the CSV writer. Where the bundle still differs from medtransfer (a DICOM VOI
LUT Sequence, DICOM series checks, palette PNGs): docs/decisions.md ("MONAI bundle") and the bundle's README.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer import io
from medtransfer._version import __version__
from medtransfer.data.spec import InputSpec
from medtransfer.data.volumes import layout_axcodes
from medtransfer.errors import ConfigError
from medtransfer.models.outputs import DEFAULT_THRESHOLD, scored_classes
from medtransfer.run_dir import Run

logger = logging.getLogger(__name__)

#: Scan kinds a bundle reads (chosen from the run's training data): MONAI reader and the files it lists.
KINDS = ("dicom", "picture", "nifti")
STEPS_MODULE = "scripts.medtransfer_steps"
#: The name the steps module is imported as in inference.json expressions.
STEPS_ALIAS = "medtransfer_steps"
#: Bundle version of a freshly exported run (the bundle's own version, not medtransfer's).
BUNDLE_VERSION = "0.1.0"
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")


def write_bundle(run: Run, traced: torch.jit.ScriptModule, out: str | Path, *, sidecar: dict[str, Any],
                 kind: str | None = None) -> Path:
    """Write the MONAI bundle of ``run`` into ``out`` (module docstring); returns ``out``.

    Args:
        run: the run.
        traced: its :class:`~medtransfer.deploy.export.CalibratedModel`, traced (calibrated probabilities).
        out: the bundle folder.
        sidecar: the export sidecar (stored in ``configs/metadata.json`` and ``models/model.json``).
        kind: ``dicom``, ``picture`` (PNG/JPEG) or ``nifti``: what the bundle reads; default: the most common
            format of the run's training data (DICOM when the run has no manifest).

    Raises:
        ConfigError: a kind the bundle cannot read for this run (PNG volumes, CT windows on pictures).
    """
    from monai.data import save_net_with_metadata

    dest = Path(out)
    kind = kind or bundle_kind(run)
    spec = run.card.input
    if kind not in KINDS:
        raise ConfigError(f"unknown bundle input kind '{kind}'; choose from {', '.join(KINDS)}")
    if kind == "picture" and (spec.spatial_dims == 3 or spec.windows):
        raise ConfigError("a PNG/JPEG bundle cannot feed a volume model or CT windows; export from DICOM or NIfTI data")
    metadata = bundle_metadata(run, sidecar)
    config = inference_config(run, kind)
    io.write_json(dest / "configs" / "metadata.json", metadata)
    io.write_text(dest / "configs" / "inference.json", json.dumps(config, indent=4) + "\n")
    io.write_text(dest / "configs" / "logging.conf", LOGGING_CONF)
    io.write_text(dest / "scripts" / "__init__.py", "")
    io.write_text(dest / "scripts" / "medtransfer_steps.py", STEPS_SOURCE)
    io.write_text(dest / "docs" / "README.md", readme(run, kind))
    io.write_json(dest / "models" / "model.json", sidecar)
    import warnings

    with io.atomic_path(dest / "models" / "model.ts") as tmp, open(tmp, "wb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 marks torch.jit.save deprecated (decisions.md)
        save_net_with_metadata(traced, fh, include_config_vals=False, meta_values=metadata,
                               more_extra_files={"inference.json": json.dumps(config).encode()})
    return dest


def bundle_kind(run: Run) -> str:
    """What the bundle reads: the most common format of the run's training cases (``png``/``jpeg`` → picture)."""
    df = run.manifest.df if run.manifest is not None else None
    if df is None or "format" not in df or not df["format"].notna().any():
        return "nifti" if run.card.input.spatial_dims == 3 and not run.card.input.windows else "dicom"
    counts = Counter("picture" if f in ("png", "jpeg") else str(f) for f in df["format"].dropna())
    kind = counts.most_common(1)[0][0]
    if len(counts) > 1:
        logger.warning("the run was trained on %s; the bundle reads %s files only (the most common)",
                       dict(counts), kind)
    return kind


def bundle_metadata(run: Run, sidecar: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: the keys MONAI's bundle specification requires, plus ``medtransfer``."""
    import monai

    card, spec = run.card, run.card.input
    classes = scored_classes(card)
    space = "D, H, W" if spec.spatial_dims == 3 else "H, W"
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medtransfer {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"fire": ">=0.4"},
        "optional_packages_version": {"pydicom": ">=2.4", "pillow": ">=9", "nibabel": ">=4"},
        "name": card.name,
        "task": f"{card.task} classification: {', '.join(card.classes)}",
        "description": f"{card.name}: {card.backbone} fine-tuned by medtransfer ({card.strategy}); outputs calibrated "
                       "probabilities. Research use only, NOT FOR CLINICAL USE.",
        "authors": "exported by medtransfer",
        "copyright": "the model's owner",
        "data_source": "the run's training data (see the medtransfer model card)",
        "data_type": bundle_kind(run),
        "image_classes": f"{spec.channels} channel(s), {space} {list(spec.size)}, normalised with mean "
                         f"{list(spec.mean)} and std {list(spec.std)}",
        "label_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(card.classes)),
        "pred_classes": f"{len(classes)} calibrated probabilities: {', '.join(classes)}",
        "intended_use": "research only; NOT FOR CLINICAL USE",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "regular", "num_channels": spec.channels,
                "spatial_shape": list(spec.size), "dtype": "float32", "value_range": [],
                "is_patch_data": False, "channel_def": {str(i): f"channel {i}" for i in range(spec.channels)},
            }},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "num_channels": len(classes),
                "spatial_shape": [1, len(classes)], "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {str(i): c for i, c in enumerate(classes)},
            }},
        },
        "medtransfer": sidecar,
    }


def inference_config(run: Run, kind: str) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's inference workflow properties (bundle_root, device, dataset_dir,
    dataset, network_def, inferer, preprocessing, postprocessing, evaluator) and ``run``."""
    card = run.card
    classes = scored_classes(card)
    thresholds = [float(card.thresholds.get(c, DEFAULT_THRESHOLD)) for c in classes]
    return {
        "imports": ["$import os", f"$import {STEPS_MODULE} as {STEPS_ALIAS}"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "input",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "datalist": f"${STEPS_ALIAS}.datalist(@dataset_dir, '{kind}', volume={card.input.spatial_dims == 3})",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing(card.input, kind)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1 if card.volume else 8,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": []},
        "evaluator": {
            "_target_": f"{STEPS_MODULE}.CSVEvaluator", "network": "@network", "dataloader": "@dataloader",
            "inferer": "@inferer", "postprocessing": "@postprocessing", "device": "@device",
            "task": card.task, "classes": list(card.classes), "scored": classes, "thresholds": thresholds,
            "output_file": "$os.path.join(@output_dir, 'predictions.csv')",
        },
        "run": ["$@evaluator.run()"],
    }


def _t(target: str, **kw: Any) -> dict[str, Any]:
    return {"_target_": target, "keys": "image", **kw}


def preprocessing(spec: InputSpec, kind: str) -> list[dict[str, Any]]:
    """The MONAI transforms (as bundle config) that rebuild ``spec``'s pipeline for ``kind`` files: the order of
    :func:`medtransfer.data.loading.read_scan` (decode, orientation, spacing, intensity, resize) and
    :func:`medtransfer.data.transforms.finalise_transforms` (channels, normalisation)."""
    steps = STEPS_MODULE
    volume = spec.spatial_dims == 3
    reader: dict[str, Any] = {
        "dicom": {"reader": "PydicomReader", "swap_ij": False, "prune_metadata": False},
        "picture": {"reader": "PILReader", "reverse_indexing": False},
        "nifti": {"reader": "NibabelReader"},
    }[kind]
    out = [_t("LoadImaged", image_only=True, dtype="$numpy.float32", **reader), _t("EnsureChannelFirstd")]
    if kind == "picture":
        out.append(_t(f"{steps}.Greyd"))
    if kind == "nifti":
        out.append(_t(f"{steps}.FiniteValuesd"))
    if not spec.windows:  # values scaled to [0, 1] as decoded (read_scan scales before the geometry)
        out += _intensity(spec, kind)
    if volume:
        out.append(_t("Orientationd", axcodes=layout_axcodes(spec.orientation), labels=None))
        if spec.spacing is not None:
            out.append(_t("Spacingd", pixdim=list(spec.spacing), mode="bilinear", padding_mode="border"))
    if spec.windows:
        out += _windows(spec, kind)
    out += [
        _t(f"{steps}.FitResized", spatial_size=list(spec.size), keep_aspect=spec.keep_aspect),
        *([_t("RepeatChanneld", repeats=spec.channels)] if spec.channels != spec.intensity_channels else []),
        _t("NormalizeIntensityd", subtrahend=list(spec.mean), divisor=list(spec.std), channel_wise=True),
        _t("EnsureTyped", dtype="$torch.float32", track_meta=False),
    ]
    return out


def _intensity(spec: InputSpec, kind: str) -> list[dict[str, Any]]:
    """``spec.window`` on the decoded values, then (DICOM) MONOCHROME1 inversion."""
    steps = STEPS_MODULE
    lo, hi = spec.percentiles
    if spec.window == "file":
        out = [_t(f"{steps}.FileWindowd", percentiles=[lo, hi])]
    elif spec.window == "percentile":
        out = [_t("ScaleIntensityRangePercentilesd", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)]
    elif spec.window == "minmax":
        out = [_t("ScaleIntensityd", minv=0.0, maxv=1.0)]
    else:  # fixed: LINEAR_EXACT, (x - c) / w + 0.5 clipped = the range c - w/2 .. c + w/2
        c, w = float(spec.window_center or 0.0), float(spec.window_width or 1.0)
        out = [_t("ScaleIntensityRanged", a_min=c - w / 2, a_max=c + w / 2, b_min=0.0, b_max=1.0, clip=True)]
    if kind == "dicom" and spec.invert_monochrome1:
        out.append(_t(f"{steps}.InvertMonochrome1d"))
    return out


def _windows(spec: InputSpec, kind: str) -> list[dict[str, Any]]:
    """One channel per CT window (LINEAR_EXACT on the modality values, in HU), stacked in ``spec.windows`` order."""
    invert = [_t(f"{STEPS_MODULE}.InvertMonochrome1d")] if kind == "dicom" and spec.invert_monochrome1 else []
    values = spec.window_values()
    if len(values) == 1:
        (c, w), = values
        return [_t("ScaleIntensityRanged", a_min=c - w / 2, a_max=c + w / 2, b_min=0.0, b_max=1.0, clip=True),
                *invert]
    names = [f"window_{i}" for i in range(len(values))]
    out: list[dict[str, Any]] = [{"_target_": "CopyItemsd", "keys": "image", "times": len(values), "names": names}]
    for name, (c, w) in zip(names, values, strict=True):
        out.append({"_target_": "ScaleIntensityRanged", "keys": name, "a_min": c - w / 2, "a_max": c + w / 2,
                    "b_min": 0.0, "b_max": 1.0, "clip": True})
        out += [{**step, "keys": name} for step in invert]
    out.append({"_target_": "ConcatItemsd", "keys": names, "name": "image", "dim": 0})
    out.append({"_target_": "DeleteItemsd", "keys": names})
    return out


def readme(run: Run, kind: str) -> str:
    """``docs/README.md``: what the model is, how to run it, what it outputs, how it differs from medtransfer."""
    card, spec = run.card, run.card.input
    classes = scored_classes(card)
    reads = {"dicom": "DICOM files (a volume model: one folder per series)", "picture": "PNG/JPEG files",
             "nifti": "NIfTI files (.nii, .nii.gz)"}[kind]
    thr = ", ".join(f"{c} >= {card.thresholds.get(c, DEFAULT_THRESHOLD):.4g}" for c in classes)
    return f"""# {card.name} (MONAI bundle exported by medtransfer {__version__})

**Research use only. NOT FOR CLINICAL USE.**

{card.task.capitalize()} classifier ({', '.join(card.classes)}) on a {card.backbone} backbone, fine-tuned by
medtransfer ({card.strategy}). `models/model.ts` is a TorchScript model whose output is the **calibrated
probability** of each of {', '.join(classes)} (temperature {card.temperature if card.temperature else 'none'}
applied inside the model). Operating points (decision when probability >= threshold): {thr}.

## Run

Needs torch, monai, fire (`pip install monai fire`) and the reader of the scans (pydicom, Pillow or nibabel);
not medtransfer. It reads {reads} under `--dataset_dir` (sub-folders included):

```
python -m monai.bundle run --config_file configs/inference.json --workflow_type infer \\
    --bundle_root . --dataset_dir /path/to/scans --output_dir /path/to/out
```

`/path/to/out/predictions.csv`: `file` (relative to the scan folder), `p_<class>` (calibrated probability),
`pred_<class>` (1/0 at the operating point), `predicted` — the columns of `medtransfer predict`.

## Input

{spec.channels} channel(s), size {list(spec.size)} ({'D, H, W' if spec.spatial_dims == 3 else 'H, W'}), float32,
normalised with mean {list(spec.mean)} and std {list(spec.std)}; `configs/inference.json` builds it from the scan
files with MONAI transforms (`preprocessing`) plus the steps in `scripts/medtransfer_steps.py`. The full
description (InputSpec, classes, thresholds, model card hash) is `medtransfer` in `configs/metadata.json`.

## Differences from medtransfer's own preprocessing

- DICOM with a VOI LUT Sequence: the bundle falls back to percentile scaling (medtransfer applies the LUT).
- DICOM series (volumes): slices are stacked as MONAI's PydicomReader orders them; medtransfer also refuses
  series with missing slices, uneven spacing or gantry tilt, which the bundle does not check.
- Palette (indexed-colour) PNGs and colour DICOM are not converted as medtransfer does.
- Percentiles on volumes over 4 million voxels: medtransfer samples every n-th voxel, the bundle too, but
  MONAI's `ScaleIntensityRangePercentilesd` (window "percentile") uses every voxel.
"""


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

# The bundle's own steps: numpy, torch and MONAI only (never medtransfer). Each reproduces a step of
# medtransfer.data (named in its docstring); tests/deploy/test_export_bundle.py checks the whole pipeline against
# Run.predict in an environment where medtransfer cannot be imported.
STEPS_SOURCE = '''"""Preprocessing steps and the CSV evaluator of a medtransfer bundle (numpy, torch and MONAI only).

Written by medtransfer's export; each step reproduces one of medtransfer's own (named in its docstring) for the
cases MONAI has no transform for.
"""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resize, SpatialPad

logger = logging.getLogger(__name__)

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SAMPLE_CAP = 4_000_000  # percentiles of larger images on every n-th value (medtransfer.data.dicom)


def _is_dicom(path):
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def datalist(dataset_dir, kind, volume=False):
    """[{"image": path, "file": path relative to dataset_dir}] for every scan under dataset_dir, sorted.

    kind: "dicom" (files with the DICM preamble or a .dcm suffix; for volumes one case per folder of slices),
    "picture" (PNG/JPEG) or "nifti".
    """
    found = []
    for folder, dirs, files in os.walk(dataset_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            low = name.lower()
            if name.startswith("."):
                continue
            if (kind == "picture" and low.endswith(PICTURE_SUFFIXES)) or (
                    kind == "nifti" and low.endswith(NIFTI_SUFFIXES)) or (kind == "dicom" and _is_dicom(path)):
                found.append(path)
    if kind == "dicom" and volume:
        found = sorted({os.path.dirname(p) for p in found})
    if not found:
        raise FileNotFoundError(f"no {kind} scans under {dataset_dir}; pass the scan folder with --dataset_dir")
    return [{"image": p, "file": os.path.relpath(p, dataset_dir).replace(os.sep, "/")} for p in found]


def _array(x):
    return x.as_tensor().numpy() if isinstance(x, MetaTensor) else np.asarray(x)


def _like(x, values):
    values = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float32))
    return MetaTensor(values, affine=x.affine, meta=x.meta) if isinstance(x, MetaTensor) else values


def _tag(meta, tag):
    """The first value of DICOM attribute `tag` ("00281050") in PydicomReader's unpruned meta, or None."""
    item = meta.get(tag) if hasattr(meta, "get") else None
    value = item.get("Value") if isinstance(item, dict) else None
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def percentile_to_unit(x, percentiles):
    """medtransfer.data.dicom.percentile_to_unit: clip at the percentiles (of every n-th value beyond 4M)."""
    x = np.asarray(x, dtype=np.float32)
    sample = x.reshape(-1)[:: max(1, x.size // SAMPLE_CAP)]
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max())
        return (x - np.float32(lo)) * np.float32(1.0 / (hi - lo) if hi > lo else 0.0)
    out = np.subtract(x, np.float32(lo), dtype=np.float32)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0)


def window_to_unit(x, center, width, function="LINEAR"):
    """medtransfer.data.dicom.window_to_unit: a DICOM VOI window (PS3.3 C.11.2.1.2) with output in [0, 1]."""
    x = np.asarray(x, dtype=np.float32)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.float32(-4.0) * (x - np.float32(center)) / np.float32(width)))
    if function != "LINEAR_EXACT" and width == 1:
        return (x > center - 0.5).astype(np.float32)
    shift, scale = (center, width) if function == "LINEAR_EXACT" else (center - 0.5, width - 1)
    out = np.subtract(x, np.float32(shift), dtype=np.float32)
    out /= np.float32(scale)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0)


class Greyd(MapTransform):
    """Colour to grey as medtransfer reads pictures: RGB(A) by ITU-R BT.601 luminance, grey + alpha by its grey."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.shape[0] >= 3:
                grey = np.tensordot(LUMA, _array(x)[:3].astype(np.float32), axes=1)[None]
                d[key] = _like(x, grey)
            elif x.shape[0] == 2:
                d[key] = x[:1]
        return d


class FiniteValuesd(MapTransform):
    """NaN and -inf to the finite minimum, +inf to the finite maximum (medtransfer.data.volumes)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            values = _array(d[key]).astype(np.float32)
            finite = np.isfinite(values)
            if not finite.all():
                lo, hi = float(values[finite].min()), float(values[finite].max())
                d[key] = _like(d[key], np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo))
        return d


class FileWindowd(MapTransform):
    """InputSpec window "file": the DICOM file's VOI window (first WindowCenter/Width, its VOILUTFunction), else
    8-bit pictures divided by 255, else percentile scaling (medtransfer.data.dicom._voi_to_unit).

    A DICOM VOI LUT Sequence is not applied here: percentile scaling instead (logged).
    """

    def __init__(self, keys, percentiles=(0.5, 99.5)):
        super().__init__(keys)
        self.percentiles = tuple(float(p) for p in percentiles)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            meta = getattr(x, "meta", {})
            values = _array(x).astype(np.float32)
            if "00280004" in meta:  # DICOM
                window = self._dicom_window(meta)
                out = window_to_unit(values, *window) if window else percentile_to_unit(values, self.percentiles)
            elif "mode" in meta and not (str(meta["mode"]).startswith("I") or meta["mode"] == "F"):
                out = np.clip(values / np.float32(255.0), 0.0, 1.0)  # 8-bit pictures (PIL modes L, RGB, ...)
            else:  # 16-bit or float pictures, NIfTI
                out = percentile_to_unit(values, self.percentiles)
            d[key] = _like(x, out)
        return d

    @staticmethod
    def _dicom_window(meta):
        if "00283010" in meta:
            logger.warning("a VOI LUT Sequence is not applied by this bundle; using percentile scaling")
            return None
        center, width = _tag(meta, "00281050"), _tag(meta, "00281051")
        if center is None or width is None or center == "" or width == "":
            return None
        function = str(_tag(meta, "00281056") or "LINEAR").strip().upper()
        center, width = float(center), float(width)
        if (function == "LINEAR" and width < 1) or width <= 0:
            return None
        return center, width, function


class InvertMonochrome1d(MapTransform):
    """MONOCHROME1 DICOM shown as MONOCHROME2 (1 - x on [0, 1] values), as InputSpec.invert_monochrome1 does."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            meta = getattr(x, "meta", {})
            if str(_tag(meta, "00280004") or "").strip() == "MONOCHROME1":
                d[key] = _like(x, np.float32(1.0) - _array(x).astype(np.float32))
        return d


def _holds_8bit_values(values):
    flat = np.ravel(values) * np.float32(255.0)
    return bool(np.abs(flat - np.round(flat)).max(initial=0.0) < 1e-3)


class FitResized(MapTransform):
    """medtransfer's resize (data.transforms.FitResized) and image-cache quantisation (data.dataset.pack_pixels).

    Resize to exactly spatial_size: area averaging when shrinking, (bi|tri)linear when enlarging; keep_aspect fits
    inside and pads with zeros. Then values are rounded to the 256 levels of an 8-bit source (when the image
    held only those before resizing) or to 65,536 levels, as medtransfer's image cache stores them.
    """

    def __init__(self, keys, spatial_size, keep_aspect=False):
        super().__init__(keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.keep_aspect = bool(keep_aspect)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            values = np.clip(_array(x).astype(np.float32), 0.0, 1.0)
            top = np.float32(255.0 if _holds_8bit_values(values) else 65535.0)
            img = torch.from_numpy(np.ascontiguousarray(values))
            src = tuple(int(s) for s in img.shape[1:])
            target = self.spatial_size
            if len(src) != len(target):
                raise ValueError(f"{len(src)}D image {src}, but the model takes {len(target)}D input {target}")
            if self.keep_aspect:
                scale = min(t / s for t, s in zip(target, src))
                target = tuple(max(1, min(t, round(s * scale))) for t, s in zip(target, src))
            if target != src:
                shrink = all(t <= s for t, s in zip(target, src))
                mode = "area" if shrink else ("bilinear" if len(src) == 2 else "trilinear")
                img = torch.as_tensor(Resize(target, mode=mode, align_corners=None if shrink else False)(img))
            if target != self.spatial_size:
                img = torch.as_tensor(SpatialPad(self.spatial_size, method="symmetric", mode="constant")(img))
            packed = np.round(np.clip(img.numpy(), 0.0, 1.0) * top)
            d[key] = torch.from_numpy((packed * np.float32(1.0 / top)).astype(np.float32))
        return d


class CSVEvaluator:
    """The bundle's evaluator: the network over every batch, calibrated probabilities and decisions to a CSV.

    Columns: file, p_<class> (what the network outputs: calibrated probabilities), pred_<class> (1 when
    p >= the class's threshold), predicted (binary: the class at the threshold; multiclass: the arg-max class;
    multilabel: the classes at or above their thresholds, ";"-joined), as `medtransfer predict` writes them.
    """

    def __init__(self, network, dataloader, inferer, postprocessing, device, task, classes, scored, thresholds,
                 output_file):
        self.network, self.dataloader, self.inferer = network, dataloader, inferer
        self.postprocessing, self.device = postprocessing, device
        self.task, self.classes, self.scored = task, list(classes), list(scored)
        self.thresholds = [float(t) for t in thresholds]
        self.output_file = output_file

    def run(self):
        rows = []
        with torch.no_grad():
            for batch in self.dataloader:
                pred = self.inferer(batch["image"].to(self.device), self.network)
                pred = self.postprocessing({"pred": pred})["pred"] if self.postprocessing else pred
                for name, p in zip(batch["file"], pred.detach().float().cpu().numpy().astype(np.float64)):
                    rows.append(self._row(name, p))
        os.makedirs(os.path.dirname(os.path.abspath(self.output_file)), exist_ok=True)
        with open(self.output_file, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", *[f"p_{c}" for c in self.scored], *[f"pred_{c}" for c in self.scored],
                             "predicted"])
            writer.writerows(rows)
        logger.info("wrote %d prediction(s) to %s", len(rows), self.output_file)
        return self.output_file

    def _row(self, name, p):
        flags = [int(v >= t) for v, t in zip(p, self.thresholds)]
        if self.task == "binary":
            predicted = self.classes[1] if flags[0] else self.classes[0]
        elif self.task == "multiclass":
            predicted = self.classes[int(np.argmax(p))]
        else:
            predicted = ";".join(c for c, f in zip(self.scored, flags) if f)
        return [name, *[repr(float(v)) for v in p], *flags, predicted]
'''
