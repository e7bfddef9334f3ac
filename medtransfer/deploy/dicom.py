"""DICOM outputs of ``medtransfer predict --dicom-out DIR``: the results filed back into each source study.

For the DICOM inputs of a prediction table (:func:`write_dicom_outputs`), per **study**:

- a **Comprehensive SR** (``SR.dcm``; TID 1500 Measurement Report built with highdicom): per case and scored
  class a measurement group whose finding is the class, with the calibrated probability (DCM 122157
  "Probability", UCUM unit ``1``), the operating point (DCM 122411 "Threshold Value"; binary and multi-label
  runs) and the decision as a qualitative evaluation (SCT 52101004 "Present" / SCT 272519000 "Absent"), the
  source images of the case, and the algorithm (model name, medtransfer version, model-card SHA-256, temperature);
  the observer is the model as a *device* (its UID derived from the card's SHA-256, so one model is one device);
  every source instance is listed in the Current Requested Procedure Evidence Sequence. Classes have no standard
  code, so they are coded in the private scheme ``99MEDTRANSFER`` (declared in the Coding Scheme Identification
  Sequence). A text item "NOT FOR CLINICAL USE" closes the report;
- a **Secondary Capture** per image (``HEATMAP-<case_id>.dcm``) or, for a volume, per key slice (the slice through
  the saliency peak, and for 2.5D models the slice with the largest attention weight: ``HEATMAP-<case_id>-S<k>``):
  the scan in grey with the Grad-CAM map of the explained class blended over it in colour (jet), on the source's
  pixel grid (longest side 512-1024 px), "NOT FOR CLINICAL USE" and the class, probability and method burned into
  bands above and below (BurnedInAnnotation YES), referencing its source image (Source Image Sequence);
- a one-page **result sheet** as Encapsulated PDF (``SHEET.dcm``, Modality DOC): the model, its version and card
  hash, per case the class probabilities, operating points and decisions, and "NOT FOR CLINICAL USE". It names
  no patient (BurnedInAnnotation NO): viewers show it inside the patient's study. WeasyPrint renders it when the
  ``pdf`` extra is installed, else matplotlib's PDF backend.

Every object copies the Patient and Study modules of a source image unchanged (same PatientID, PatientName,
StudyInstanceUID, ...; attributes the source lacks are left out, or empty where DICOM requires them), has new
Series and SOP Instance UIDs (``pydicom.uid.generate_uid``), Manufacturer ``medtransfer`` and SoftwareVersions
the medtransfer version, and is written atomically into ``DIR/study-<key>/``, where ``key`` is the study's
pseudonymous key (the manifest's ``study_key``), so that folder names carry no identifier.

Privacy: these files are clinical records for the hospital's own systems and carry the source's identifiers on
purpose; everything else stays pseudonymous. Logs and the returned notes name cases by ``case_id`` and studies
by their key; pydicom's and highdicom's own warnings and log records (which can quote header values and UIDs)
are muted while reading and writing, and a failure is reported by its exception type only.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import html
import io as stdio
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from medtransfer import io
from medtransfer._optional import require
from medtransfer._version import __version__
from medtransfer.data.dicom import quiet_pydicom
from medtransfer.data.headers import sniff_format
from medtransfer.data.privacy import pseudonym
from medtransfer.data.spec import InputSpec
from medtransfer.digest import sha256_file
from medtransfer.errors import DiskFullError
from medtransfer.models.outputs import scored_classes, thresholds_of
from medtransfer.run_dir import Run

logger = logging.getLogger(__name__)

#: The private coding scheme of the class concepts (no standard code exists for a model's own classes).
CODING_SCHEME = "99MEDTRANSFER"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
MANUFACTURER = "medtransfer"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: Series numbers of the new series (high, so they sort after the source series in a viewer).
SERIES_NUMBERS = {"heatmap": 9901, "sr": 9902, "sheet": 9903}
#: The SC's longest side is brought into this range (small inputs are enlarged so the text is legible).
SC_MIN_SIDE, SC_MAX_SIDE = 512, 1024
HEAT_ALPHA = 0.45

NOT_DICOM = ("not a DICOM input (PNG, JPEG or NIfTI): there is no DICOM study to file its results into; "
             "its scores are in the CSV")
NOT_SCORED = "could not be scored (see its 'error')"
NO_STUDY = "its DICOM header has no StudyInstanceUID to file the results into"
NOT_FOUND = "its DICOM series could not be found again in the folder"


@dataclass
class DicomOutputs:
    """What :func:`write_dicom_outputs` wrote.

    Attributes:
        folders: case_id → the study folder (relative to the output folder) its objects went to.
        files: every file written.
        skipped: case_id → why it got no DICOM outputs (PHI-free).
        notes: case_id → what is missing from its outputs although its study was written (e.g. no heat map).
    """

    folders: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def annotate(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` with ``dicom_out`` (the case's study folder, or empty) and ``dicom_note`` (why it has no, or
        incomplete, DICOM outputs; empty when complete) appended."""
        ids = table["case_id"].astype(str)
        notes = {**self.notes, **self.skipped}
        return table.assign(dicom_out=[self.folders.get(c, "") for c in ids], dicom_note=[notes.get(c, "") for c in ids])

    def summary(self) -> list[str]:
        """One line per reason cases got no (or incomplete) DICOM outputs, with counts; PHI-free."""
        counts: dict[str, int] = defaultdict(int)
        for reason in [*self.skipped.values(), *self.notes.values()]:
            counts[reason] += 1
        return [f"{n} case(s): {reason}" for reason, n in counts.items()]


@dataclass
class _Case:
    """One scored DICOM case: its table row, its source files and their headers (no pixels), study and kind."""

    case_id: str
    row: pd.Series
    files: list[Path]
    headers: list[Any]
    volume: bool

    @property
    def study_uid(self) -> str:
        return str(self.headers[0].get("StudyInstanceUID", "") or "")


# -- entry point ----------------------------------------------------------------------------------------------
def write_dicom_outputs(run: Run, table: pd.DataFrame, out_dir: str | os.PathLike[str], *,
                        method: str = "gradcam", device: str = "cpu") -> DicomOutputs:
    """File the predictions of DICOM inputs back into their studies as SR, heat-map SC and PDF sheet.

    Args:
        run: the run that scored the cases (its card gives classes, operating points and preprocessing).
        table: the table of :meth:`Run.predict` on scan files/folders (``case_id``, ``file``, ``p_<class>``,
            ``pred_<class>``, ``predicted``, ``error``, optional ``peak_slice``).
        out_dir: the output folder; one sub-folder per study (``study-<key>``).
        method: the saliency method of the heat maps (see :func:`medtransfer.explain.explain`).
        device: where the saliency maps are computed (``cpu``, ``cuda``, ``auto``).

    Returns:
        :class:`DicomOutputs`. A case that is not DICOM, was not scored, or whose study cannot be written is
        listed in ``skipped`` with the reason; it never stops the others.

    Raises:
        MissingDependency: highdicom is not installed (``pip install "medtransfer[dicom-out]"``).

    Examples:
        >>> out = write_dicom_outputs(load_run("runs/cxr1"), table, "dicom_out/")  # doctest: +SKIP
    """
    require("highdicom", extra="dicom-out", purpose="DICOM outputs (--dicom-out)")
    out = Path(out_dir)
    result = DicomOutputs()
    cases = _locate(table, out, result.skipped)
    studies: dict[str, list[_Case]] = defaultdict(list)
    for case in cases:
        if case.study_uid:
            studies[case.study_uid].append(case)
        else:
            result.skipped[case.case_id] = NO_STUDY
    model = _Model.of(run)
    for study_uid, members in studies.items():
        key = "study-" + pseudonym(study_uid, kind="study")
        try:
            files = _write_study(model, members, out / key, method=method, device=device, notes=result.notes)
        except DiskFullError:
            raise  # the next study would not fit either; the CLI says what to do
        except Exception as exc:  # noqa: BLE001 - one study's failure never stops the others
            reason = f"writing its study's DICOM objects failed ({type(exc).__name__})"
            logger.warning("%s: %s", key, reason)
            result.skipped.update({c.case_id: reason for c in members})
            continue
        result.files.extend(files)
        result.folders.update({c.case_id: key for c in members})
    for line in result.summary():
        logger.warning("no or incomplete DICOM outputs for %s", line)
    return result


# -- finding the source files and headers ----------------------------------------------------------------------
def _locate(table: pd.DataFrame, out: Path, skipped: dict[str, str]) -> list[_Case]:
    """The table's scored DICOM cases with their source files and headers; the others go to ``skipped``."""
    cases = []
    p_cols = [c for c in table.columns if c.startswith("p_")]
    for _, row in table.iterrows():
        case_id = str(row["case_id"])
        error = row.get("error")
        if (isinstance(error, str) and error) or row[p_cols].isna().any():
            skipped[case_id] = NOT_SCORED
            continue
        path = Path(str(row["file"])).expanduser()
        if path.is_dir():
            files, headers = _series_in(path, out)
            if not files:
                skipped[case_id] = NOT_FOUND
                continue
            cases.append(_Case(case_id, row, files, headers, volume=True))
            continue
        if sniff_format(path) != "dicom":
            skipped[case_id] = NOT_DICOM
            continue
        header = _read_header(path)
        if header is None:
            skipped[case_id] = NOT_FOUND
            continue
        frames = int(header.get("NumberOfFrames", 1) or 1)
        cases.append(_Case(case_id, row, [path], [header], volume=frames > 1))
    return cases


def _read_header(path: Path) -> Any:
    """The DICOM header of ``path`` without pixel data (None when unreadable), pydicom's messages muted."""
    import pydicom

    with _quiet():
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - any parse failure means "not usable"
            return None


def _series_in(folder: Path, out: Path) -> tuple[list[Path], list[Any]]:
    """The slices of the series whose case is ``folder`` (index_scans' rule: the series whose deepest common
    folder it is), sorted along the slice normal, and their headers; ``out`` (our own output) is skipped."""
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    skip = out.resolve()
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() != skip)
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or sniff_format(path) != "dicom":
                continue
            header = _read_header(path)
            if header is not None and header.get("SeriesInstanceUID"):
                groups[str(header.SeriesInstanceUID)].append((path, header))
    want = os.path.realpath(folder)
    for members in groups.values():
        common = os.path.commonpath([os.path.realpath(p.parent) for p, _ in members])
        if common == want:
            members.sort(key=lambda m: _along_normal(m[1]))
            return [p for p, _ in members], [h for _, h in members]
    return [], []


def _along_normal(header: Any) -> float:
    """A slice's position along its normal (LPS mm), for sorting; its InstanceNumber when it has no geometry."""
    try:
        iop = np.asarray([float(v) for v in header.ImageOrientationPatient])
        ipp = np.asarray([float(v) for v in header.ImagePositionPatient])
        return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))
    except (AttributeError, TypeError, ValueError):
        return float(header.get("InstanceNumber", 0) or 0)


# -- the model and what it says about a case -------------------------------------------------------------------
@dataclass
class _Model:
    """What every object says about the model: name, backbone, version, card hash, classes, operating points."""

    run: Run
    name: str
    card_sha256: str
    classes: list[str]
    thresholds: dict[str, float]
    device_uid: str

    @classmethod
    def of(cls, run: Run) -> _Model:
        from pydicom.uid import generate_uid

        card_file = run.path / "model_card.json"
        sha = sha256_file(card_file) if card_file.is_file() else hashlib.sha256(
            run.card.model_dump_json().encode()).hexdigest()
        return cls(run=run, name=_ascii(run.card.name, 64) or "medtransfer model", card_sha256=sha,
                   classes=scored_classes(run.card), thresholds=thresholds_of(run.card),
                   device_uid=generate_uid(entropy_srcs=["medtransfer-model", sha]))

    @property
    def task(self) -> str:
        return str(self.run.card.task)

    @property
    def version(self) -> str:
        return f"medtransfer {__version__}"

    def decision(self, row: pd.Series, cls: str) -> bool:
        """The decision for ``cls``: the CSV's ``pred_<class>`` (the operating point), or for a multi-class
        run the arg-max class (``predicted``), since its classes exclude each other."""
        if self.task == "multiclass":
            return str(row.get("predicted", "")) == cls
        return bool(int(row[f"pred_{cls}"]) == 1)

    def explained(self, row: pd.Series) -> tuple[int, str]:
        """The model output the heat map explains and its class: binary the positive class, multi-class the
        predicted class, multi-label the most probable class."""
        if self.task == "binary":
            return 0, self.classes[0]
        probs = [float(row[f"p_{c}"]) for c in self.classes]
        j = int(np.argmax(probs))
        if self.task == "multiclass" and str(row.get("predicted", "")) in self.classes:
            j = self.classes.index(str(row["predicted"]))
        return j, self.classes[j]


# -- one study --------------------------------------------------------------------------------------------------
def _write_study(model: _Model, cases: list[_Case], folder: Path, *, method: str, device: str,
                 notes: dict[str, str]) -> list[Path]:
    """Heat-map SCs, the SR and the PDF sheet of one study, all built before the first is written (a study
    that fails leaves no partial set behind); returns the files written."""
    from pydicom.uid import generate_uid

    objects: list[tuple[Any, str]] = []
    sc_series = generate_uid()
    for case in cases:
        try:
            for k, (rgb, spacing, orientation, refs, label) in enumerate(
                    _heatmaps(model, case, method=method, device=device)):
                ds = _secondary_capture(model, case, rgb, spacing, orientation, refs, label, sc_series,
                                        instance=len(objects) + 1)
                objects.append((ds, f"HEATMAP-{case.case_id}" + (f"-S{k + 1}" if case.volume else "") + ".dcm"))
        except Exception as exc:  # noqa: BLE001 - the SR and the sheet still report this case
            notes[case.case_id] = f"no heat map ({type(exc).__name__}); its SR and PDF entries were written"
            logger.warning("case %s: no heat map (%s)", case.case_id, type(exc).__name__)
            objects = [(ds, name) for ds, name in objects if not name.startswith(f"HEATMAP-{case.case_id}")]
    objects += [(_structured_report(model, cases), "SR.dcm"), (_sheet(model, cases), "SHEET.dcm")]
    return [_save(ds, folder / name) for ds, name in objects]


def _save(ds: Any, path: Path) -> Path:
    """Write a DICOM file (preamble + file meta) atomically, pydicom's messages muted."""
    with _quiet(), io.atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _quiet() -> contextlib.AbstractContextManager[None]:
    """Mute pydicom's and highdicom's warnings and log records (they quote header values and UIDs), and
    WeasyPrint's progress records."""
    return quiet_pydicom("highdicom", "weasyprint", "fontTools")


def _common(ds: Any, source: Any, series_description: str, model: _Model) -> None:
    """What every object shares: the source's Patient and Study modules as they are, equipment, no PHI added."""
    with _quiet():
        try:
            ds.copy_patient_and_study_information(source)
        except (KeyError, AttributeError):  # a SOP class highdicom does not know: the usual attributes
            for keyword in _PATIENT_STUDY:
                if keyword in source:
                    ds[keyword] = source[keyword]
    ds.SeriesDescription = _ascii(series_description, 64)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model.name
    ds.SoftwareVersions = __version__


_PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                  "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight", "StudyInstanceUID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
                  "StudyDescription")


def _evidence_head(source: Any) -> Any:
    """A copy of ``source``'s header whose missing Type 2 Patient/Study attributes are present and empty
    (highdicom reads them as attributes; empty values add nothing to the objects)."""
    import copy

    head = copy.deepcopy(source)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in head:
            setattr(head, keyword, "")
    return head


# -- heat maps --------------------------------------------------------------------------------------------------
def _heatmaps(model: _Model, case: _Case, *, method: str, device: str) -> list[tuple]:
    """(rgb, pixel spacing, PatientOrientation, source references, label) per SC of ``case``."""
    from medtransfer.data.dataset import preprocess
    from medtransfer.data.loading import read_scan
    from medtransfer.device import resolve_device
    from medtransfer.explain.saliency import explain

    spec = model.run.card.input
    source: Any = case.files if len(case.files) > 1 else case.files[0]
    x = preprocess(source, spec)
    display = read_scan(source, spec, resize=False)
    j, cls = model.explained(case.row)
    target = resolve_device(device)
    net = model.run.model
    home = next(net.parameters()).device
    try:
        net.to(target)
        sal = explain(model.run, x[None], method=method, target=j).maps[0, 0].float().numpy()
    finally:
        net.to(home)
    grey = display.as_tensor()[0].float().numpy()
    spacing = [float(s) for s in display.meta.get("spacing", ())]
    p = float(case.row[f"p_{cls}"])
    decided = "present" if model.decision(case.row, cls) else "absent"
    empty = " [empty map: no evidence for it]" if not sal.max() > 0 else ""
    label = f"{cls} p={p:.2f} ({decided}){empty} - {method} - {model.name} - medtransfer {__version__}"
    sal = _unfit(sal, grey.shape, spec)
    if not case.volume:
        orientation = [str(v) for v in case.headers[0].get("PatientOrientation", []) or []]
        ps = case.headers[0].get("PixelSpacing")
        rgb, scale = _render(grey, sal, label)
        pixel_spacing = [float(v) / scale for v in ps] if ps is not None and len(ps) == 2 else None
        return [(rgb, pixel_spacing, orientation, _refs(case.headers), label)]
    return [_volume_slice(model, case, grey, sal, spacing, spec, d, label) for d in _key_slices(case, sal)]


def _unfit(sal: np.ndarray, shape: Sequence[int], spec: InputSpec) -> np.ndarray:
    """The model-grid map on the display grid ``shape``: the padding of ``keep_aspect`` cropped, then resized
    (volumes: only the in-plane resize is deferred to :func:`_plane`, the slice axis is cropped here)."""
    if spec.keep_aspect:
        size = tuple(int(s) for s in sal.shape)
        scale = min(t / s for t, s in zip(size, shape, strict=True))
        fitted = [max(1, min(t, round(s * scale))) for t, s in zip(size, shape, strict=True)]
        starts = [(t - f) // 2 for t, f in zip(size, fitted, strict=True)]
        sal = sal[tuple(slice(a, a + f) for a, f in zip(starts, fitted, strict=True))]
    return np.ascontiguousarray(sal, dtype=np.float32)


def _key_slices(case: _Case, sal: np.ndarray) -> list[int]:
    """Model-grid slice indices worth a picture: through the saliency peak, then the largest attention weight
    (2.5D models' ``peak_slice``); at most two, distinct."""
    peak = int(np.unravel_index(int(np.argmax(sal)), sal.shape)[0]) if sal.max() > 0 else sal.shape[0] // 2
    keys = [peak]
    attention = case.row.get("peak_slice")
    if attention is not None and not pd.isna(attention) and 0 <= int(attention) < sal.shape[0]:
        keys.append(int(attention))
    return list(dict.fromkeys(keys))


def _volume_slice(model: _Model, case: _Case, grey: np.ndarray, sal: np.ndarray, spacing: list[float],
                  spec: InputSpec, d: int, label: str) -> tuple:
    """One key slice of a volume: the display slice it falls in, rendered, and the source slice it shows."""
    depth = grey.shape[0]
    d0 = min(depth - 1, int((d + 0.5) * depth / sal.shape[0]))
    label = f"slice {d0 + 1}/{depth} - {label}"
    rgb, scale = _render(grey[d0], sal[d], label)
    ras = str(spec.orientation).upper() == "RAS"
    axial = ras and _is_axial(case.headers[0]) and len(case.headers) > 1
    # RAS axial slices are shown as stored: columns from the patient's right to left, rows anterior to posterior
    orientation = ["L", "P"] if ras else []
    pixel_spacing = [spacing[1] / scale, spacing[2] / scale] if len(spacing) == 3 else None
    if axial:  # the source slice at the same height (slices are sorted inferior to superior here)
        i = min(len(case.headers) - 1, int((d0 + 0.5) * len(case.headers) / depth))
        refs = _refs([case.headers[i]])
    else:  # another orientation, or one multi-frame object: the slice derives from the whole series
        refs = _refs(case.headers)
    return rgb, pixel_spacing, orientation, refs, label


def _is_axial(header: Any) -> bool:
    """An axial slice (normal within ~37° of the patient's head-foot axis) whose normal points superior."""
    try:
        iop = np.asarray([float(v) for v in header.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return False
    normal = np.cross(iop[:3], iop[3:])
    return bool(normal[2] > 0.8)


def _render(grey: np.ndarray, sal: np.ndarray, label: str) -> tuple[np.ndarray, float]:
    """RGB uint8 (H', W', 3): the grey image with the map blended over it (opacity follows the map), enlarged or
    shrunk so its longest side is in [SC_MIN_SIDE, SC_MAX_SIDE], with a band above ("NOT FOR CLINICAL USE") and
    one below (``label``). Returns it and the scale factor applied to the image grid."""
    from matplotlib import colormaps

    h, w = grey.shape
    scale = min(max(1.0, SC_MIN_SIDE / max(h, w)), SC_MAX_SIDE / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = _resize(grey, size)
    heat = np.clip(_resize(sal, size), 0, 1)
    alpha = (HEAT_ALPHA * heat)[..., None]
    rgb = np.clip(img, 0, 1)[..., None] * (1 - alpha) + colormaps["jet"](heat)[..., :3] * alpha
    return _bands(np.round(rgb * 255).astype(np.uint8), label), size[0] / h


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) == size:
        return t[0, 0].numpy()
    shrink = size[0] <= t.shape[-2] and size[1] <= t.shape[-1]
    out = F.interpolate(t, size=size, mode="area") if shrink else F.interpolate(t, size=size, mode="bilinear",
                                                                                  align_corners=False)
    return out[0, 0].numpy()


def _bands(rgb: np.ndarray, label: str) -> np.ndarray:
    """Black bands above and below the image: "NOT FOR CLINICAL USE" (yellow) and ``label`` (white)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    font_px = max(12, round(w * 0.032))
    band = round(font_px * 1.8)
    canvas = Image.new("RGB", (w, h + 2 * band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, band))
    draw = ImageDraw.Draw(canvas)
    for text, y, colour, px in ((NOT_FOR_CLINICAL_USE, 0, (255, 230, 0), font_px),
                                (_ascii(label, 200), h + band, (255, 255, 255), max(10, round(font_px * 0.7)))):
        font = ImageFont.load_default(size=px)
        while draw.textlength(text, font=font) > w - 8 and len(text) > 4:
            text = text[:-4] + "..."
        draw.text((w / 2, y + band / 2), text, fill=colour, font=font, anchor="mm")
    return np.asarray(canvas, dtype=np.uint8)


def _refs(headers: Sequence[Any]) -> list[Any]:
    """Source Image Sequence items (SOP class and instance) for ``headers``."""
    from pydicom.dataset import Dataset

    items = []
    for h in headers:
        item = Dataset()
        item.ReferencedSOPClassUID = h.SOPClassUID
        item.ReferencedSOPInstanceUID = h.SOPInstanceUID
        items.append(item)
    return items


def _secondary_capture(model: _Model, case: _Case, rgb: np.ndarray, spacing: list[float] | None,
                       orientation: list[str], refs: list[Any], label: str, series_uid: str, instance: int) -> Any:
    """The heat map as a Secondary Capture Image in the source study, referencing its source image."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    source = case.headers[0]
    with _quiet():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=_evidence_head(source), pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SERIES_NUMBERS["heatmap"],
            sop_instance_uid=generate_uid(), instance_number=instance, manufacturer=MANUFACTURER,
            pixel_spacing=tuple(spacing) if spacing else None, patient_orientation=("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian)
    _common(sc, source, f"medtransfer heat maps ({NOT_FOR_CLINICAL_USE})", model)
    sc.SeriesNumber = SERIES_NUMBERS["heatmap"]
    sc.PatientOrientation = orientation if len(orientation) == 2 else ""
    _laterality(sc, source)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.LossyImageCompression = "00"
    sc.ImageComments = _ascii(f"{NOT_FOR_CLINICAL_USE}. Saliency overlay: {label}", 10240)
    sc.DerivationDescription = _ascii(f"{label}; heat map (jet, opacity {HEAT_ALPHA} at full saliency) over the "
                                      "scan as the model saw it", 1024)
    sc.SourceImageSequence = refs
    return sc


#: Body parts that come in pairs (General Series Laterality is then required, empty when unknown).
PAIRED_BODY_PARTS = frozenset({"BREAST", "EYE", "EAR", "KIDNEY", "OVARY", "TESTIS", "SHOULDER", "ELBOW", "WRIST",
                               "HAND", "FINGER", "HIP", "KNEE", "ANKLE", "FOOT", "TOE", "HEEL", "ARM", "FOREARM",
                               "LEG", "THIGH", "HUMERUS", "FEMUR", "TIBIA", "FIBULA", "CLAVICLE", "SCAPULA", "ORBIT",
                               "EXTREMITY", "UPR EXTREMITY", "LWR EXTREMITY"})


def _laterality(sc: Any, source: Any) -> None:
    """BodyPartExamined as in the source, and Laterality (Type 2C): the source's side; empty (unknown) for a
    paired or unnamed body part; absent for an unpaired one (what dciodvfy's condition expects)."""
    part = str(source.get("BodyPartExamined", "") or "").upper()
    if part:
        sc.BodyPartExamined = source.BodyPartExamined
    side = next((str(source.get(k)) for k in ("Laterality", "ImageLaterality", "FrameLaterality")
                 if str(source.get(k, "") or "") in ("R", "L")), "")
    if side or not part or part in PAIRED_BODY_PARTS:
        sc.Laterality = side


# -- structured report ------------------------------------------------------------------------------------------
def _code(cls: str) -> Any:
    """The private concept for class ``cls`` (value: the name when it fits a DICOM code value, else a hash)."""
    import highdicom as hd

    value = cls if re.fullmatch(r"[A-Za-z0-9_.\-]{1,16}", cls) else "C" + hashlib.sha256(cls.encode()).hexdigest()[:15]
    return hd.sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=_ascii(cls, 64) or value)


def _structured_report(model: _Model, cases: list[_Case]) -> Any:
    """The study's Comprehensive SR (TID 1500): one measurement group per case and scored class."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.name, manufacturer_name=MANUFACTURER,
            model_name=_ascii(model.run.card.backbone, 64), serial_number=model.card_sha256[:16]))
    temperature = model.run.card.temperature
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=f"{model.version}; model card sha256 {model.card_sha256}",
        parameters=[f"backbone {model.run.card.backbone}", f"task {model.task}",
                    f"temperature {temperature:.4g}" if temperature else "temperature none (uncalibrated)",
                    f"model card sha256 {model.card_sha256}"])
    unit = codes.UCUM.NoUnits
    groups = []
    for case in cases:
        sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in case.headers]
        for cls in model.classes:
            measurements = [hd.sr.Measurement(name=codes.DCM.Probability, value=float(case.row[f"p_{cls}"]),
                                              unit=unit)]
            if model.task != "multiclass":
                measurements.append(hd.sr.Measurement(name=codes.DCM.ThresholdValue,
                                                      value=float(model.thresholds[cls]), unit=unit))
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                             identifier=f"{case.case_id} {_ascii(cls, 40)}"),
                finding_type=_code(cls), algorithm_id=algorithm, measurements=measurements,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                    name=_code(cls), value=codes.SCT.Present if model.decision(case.row, cls) else codes.SCT.Absent)],
                source_images=sources))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging"),
        imaging_measurements=groups)
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, relationship_type="CONTAINS",
        value=f"{NOT_FOR_CLINICAL_USE}. Output of a research model ({model.name}, {model.version}); not verified "
              "by a physician. Probabilities are calibrated; decisions use the model's stored operating points."))
    evidence = [_evidence_head(cases[0].headers[0]), *[h for c in cases for h in c.headers]]
    with _quiet():
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence, content=report[0], series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBERS["sr"], sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
            coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=CODING_SCHEME, name="medtransfer model classes",
                responsible_organization="medtransfer (private scheme: the classes of one model card)")])
    _common(sr, cases[0].headers[0], f"medtransfer results ({NOT_FOR_CLINICAL_USE})", model)
    sr.SeriesNumber = SERIES_NUMBERS["sr"]
    return sr


# -- the PDF result sheet ---------------------------------------------------------------------------------------
def _sheet(model: _Model, cases: list[_Case]) -> Any:
    """The study's one-page result sheet as an Encapsulated PDF instance (Modality DOC)."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pdf = _sheet_pdf(model, cases)
    source = cases[0].headers[0]
    head = _evidence_head(source)
    now = datetime.datetime.now()
    with _quiet():
        ds = hd.SOPClass(
            study_instance_uid=source.StudyInstanceUID, series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBERS["sheet"], sop_instance_uid=generate_uid(),
            sop_class_uid=ENCAPSULATED_PDF_STORAGE, instance_number=1, modality="DOC", manufacturer=MANUFACTURER,
            transfer_syntax_uid=ExplicitVRLittleEndian, patient_id=head.PatientID, patient_name=head.PatientName,
            patient_birth_date=head.PatientBirthDate, patient_sex=head.PatientSex,
            accession_number=head.AccessionNumber, study_id=head.StudyID, study_date=head.StudyDate,
            study_time=head.StudyTime, referring_physician_name=head.ReferringPhysicianName,
            specific_character_set=source.get("SpecificCharacterSet"))
    _common(ds, source, f"medtransfer result sheet ({NOT_FOR_CLINICAL_USE})", model)
    ds.SeriesNumber = SERIES_NUMBERS["sheet"]
    ds.ConversionType = "WSD"
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = _ascii(f"medtransfer result sheet - {NOT_FOR_CLINICAL_USE}", 64)
    ds.ConceptNameCodeSequence = []
    ds.SourceInstanceSequence = _refs([h for c in cases for h in c.headers])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    return ds


def _sheet_rows(model: _Model, cases: list[_Case]) -> tuple[list[str], list[list[str]]]:
    """The sheet's table: one row per case and class (image, class, probability, operating point, decision)."""
    header = ["image", "class", "probability", "operating point", "decision"]
    rows = []
    for case in cases:
        h = case.headers[0]
        parts = [str(h.get("Modality", "") or ""), f"series {h.SeriesNumber}" if h.get("SeriesNumber") else "",
                 f"{len(case.headers)} slices" if len(case.headers) > 1 else
                 f"image {h.InstanceNumber}" if h.get("InstanceNumber") else ""]
        what = " ".join(_ascii(p, 16) for p in parts if p)
        for cls in model.classes:
            thr = "arg-max" if model.task == "multiclass" else f"{model.thresholds[cls]:.3f}"
            rows.append([f"{what} [{case.case_id}]", _ascii(cls, 64), f"{float(case.row[f'p_{cls}']):.3f}", thr,
                         "present" if model.decision(case.row, cls) else "absent"])
    return header, rows


def _sheet_lines(model: _Model) -> list[str]:
    card = model.run.card
    return [f"Model: {model.name} ({card.backbone}, {card.task}; classes {', '.join(card.classes)})",
            f"Software: {model.version}; model card created {card.created}",
            f"Model card SHA-256: {model.card_sha256}",
            f"Probabilities are calibrated (temperature {card.temperature or 1.0:.3g}); decisions use the stored "
            "operating points" + (" (multi-class: the most probable class)" if card.task == "multiclass" else "")
            + ".",
            "Heat maps (secondary captures in this study) show where the model looked (Grad-CAM), not a lesion "
            "outline."]


def _sheet_pdf(model: _Model, cases: list[_Case]) -> bytes:
    """The sheet as PDF bytes: WeasyPrint (the ``pdf`` extra) when it works here, else matplotlib's PDF backend."""
    try:
        import weasyprint
    except (ImportError, OSError):  # not installed, or its system libraries (pango) are missing
        return _sheet_matplotlib(model, cases)
    header, rows = _sheet_rows(model, cases)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    lines = "".join(f"<p>{html.escape(line)}</p>" for line in _sheet_lines(model))
    page = (f"<html><head><meta charset='utf-8'><title>medtransfer result sheet</title><style>"
            "@page{size:A4;margin:18mm} body{font-family:sans-serif;font-size:10pt}"
            ".warn{color:#b00;font-weight:bold;font-size:16pt;border:2px solid #b00;padding:4px;text-align:center}"
            "table{border-collapse:collapse;width:100%;margin-top:8px} td,th{border:1px solid #999;padding:3px 5px;"
            "text-align:left;font-size:9pt}</style></head><body>"
            f"<div class='warn'>{NOT_FOR_CLINICAL_USE}</div><h2>medtransfer result sheet</h2>{lines}"
            f"<table><tr>{''.join(f'<th>{c}</th>' for c in header)}</tr>{cells}</table>"
            f"<p class='warn' style='font-size:11pt;margin-top:12px'>{NOT_FOR_CLINICAL_USE}: research software; "
            "not a medical device; results not verified by a physician.</p></body></html>")
    with _quiet():
        return weasyprint.HTML(string=page).write_pdf()


def _sheet_matplotlib(model: _Model, cases: list[_Case]) -> bytes:
    from matplotlib.backends.backend_pdf import FigureCanvasPdf
    from matplotlib.figure import Figure

    header, rows = _sheet_rows(model, cases)
    fig = Figure(figsize=(8.27, 11.69))
    FigureCanvasPdf(fig)
    fig.text(0.5, 0.95, NOT_FOR_CLINICAL_USE, ha="center", fontsize=18, color="#b00", weight="bold")
    fig.text(0.08, 0.91, "medtransfer result sheet", fontsize=14)
    for i, line in enumerate(_sheet_lines(model)):
        fig.text(0.08, 0.88 - 0.02 * i, line, fontsize=7, wrap=True)
    ax = fig.add_axes((0.08, 0.1, 0.84, 0.66))
    ax.set_axis_off()
    if rows:
        table = ax.table(cellText=rows[:40], colLabels=header, loc="upper left", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
    fig.text(0.5, 0.05, f"{NOT_FOR_CLINICAL_USE}: research software; not a medical device.", ha="center",
             fontsize=9, color="#b00")
    buf = stdio.BytesIO()
    fig.savefig(buf, format="pdf", metadata={"Creator": "medtransfer", "Producer": "medtransfer"})
    return buf.getvalue()


def _ascii(text: str, limit: int) -> str:
    """Printable ASCII, at most ``limit`` characters (DICOM LO/SH/DT limits; the default character set)."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in str(text))[:limit]
