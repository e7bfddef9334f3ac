"""Small replicas of five public datasets' official layouts: RSNA Pneumonia, Kermany, VinDr-CXR, PadChest, COVID.

Each builder writes, under a folder, the dataset's own file names, CSV headers and value conventions (taken from
the releases as torchxrayvision and the distributors describe them) with a few rows that include the awkward
cases: several boxes or readers per image, blank labels, ``todo`` findings, lateral views, patients with several
studies, a listed image missing on disk, the Kaggle zip's duplicate tree. Images are tiny real files (JPEG/PNG via
Pillow, DICOM via pydicom with the header fields the adapters read). The ids are made up, in the datasets' shapes.

The expected rows live beside each builder (``*_EXPECTED`` and friends) so that tests check exact values.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from medtransfer.data.dicom import quiet_pydicom
from tests.factories import chest_like, write_dicom

SIZE = 48


# ------------------------------------------------------------------------------------------------ images


def _grey(seed: int, *, positive: bool = False, size: int = SIZE, max_value: int = 255) -> np.ndarray:
    """A chest-like grey image; ``positive`` adds a bright blob in a lung (so tiny runs have something to learn)."""
    img = chest_like(size, seed=seed, dtype=np.float64, max_value=max_value)
    if positive:
        yy, xx = np.mgrid[0:size, 0:size] / size
        img += 0.45 * max_value * np.exp(-(((xx - 0.33) ** 2 + (yy - 0.45) ** 2) / (2 * 0.06**2)))
    return np.clip(img, 0, max_value)


def write_jpeg(path: Path, seed: int, *, positive: bool = False) -> Path:
    """An 8-bit grey JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_grey(seed, positive=positive).astype(np.uint8)).save(path, format="JPEG", quality=90)
    return path


def write_png(path: Path, seed: int, *, positive: bool = False, bits: int = 8) -> Path:
    """A grey PNG, 8- or 16-bit (PadChest's are 16-bit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    top = 65535 if bits == 16 else 255
    pixels = _grey(seed, positive=positive, max_value=top).astype(np.uint16 if bits == 16 else np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def write_xray_dicom(path: Path, seed: int, *, positive: bool = False, **header: object) -> Path:
    """A 12-bit grey CR DICOM with the given header fields (PatientSex, PatientAge, ViewPosition...)."""
    pixels = _grey(seed, positive=positive, max_value=4095).astype(np.uint16)
    with quiet_pydicom():  # RSNA-style ages ("51") are not valid DICOM AS values: pydicom warns on writing
        return write_dicom(path, pixels, bits_stored=12, institution=None, **header)  # type: ignore[arg-type]


def _write_csv(path: Path, header: list[str], rows: list[list[object]], *, trailing_comma: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*header, ""] if trailing_comma else header)
    for row in rows:
        writer.writerow([*row, ""] if trailing_comma else row)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ Kermany

#: (official folder, class folder, file name) of the replica: ``chest_xray/<folder>/<class>/<name>``.
KERMANY_FILES: tuple[tuple[str, str, str], ...] = (
    ("train", "NORMAL", "IM-0115-0001.jpeg"),
    ("train", "NORMAL", "IM-0117-0001.jpeg"),
    ("train", "NORMAL", "IM-0119-0001.jpeg"),
    ("train", "NORMAL", "IM-0119-0001-0002.jpeg"),  # a second image of the same child
    ("train", "NORMAL", "IM-0535-0001.jpeg"),
    ("train", "NORMAL", "NORMAL2-IM-0535-0001.jpeg"),  # the second series: another child
    ("train", "PNEUMONIA", "person1_bacteria_1.jpeg"),
    ("train", "PNEUMONIA", "person1_bacteria_2.jpeg"),
    ("train", "PNEUMONIA", "person3_virus_15.jpeg"),
    ("train", "PNEUMONIA", "person1527_bacteria_3988.jpeg"),
    ("train", "PNEUMONIA", "person1527_virus_2661.jpeg"),  # bacterial and viral images of one child
    ("val", "NORMAL", "NORMAL2-IM-1427-0001.jpeg"),
    ("val", "PNEUMONIA", "person1946_bacteria_4874.jpeg"),
    ("test", "NORMAL", "IM-0001-0001.jpeg"),
    ("test", "NORMAL", "NORMAL2-IM-0007-0001.jpeg"),
    ("test", "PNEUMONIA", "person100_bacteria_475.jpeg"),
    ("test", "PNEUMONIA", "person1_virus_11.jpeg"),  # person1 is also in train: prepare moves them to test
)


def kermany_extra_files(n: int) -> list[tuple[str, str, str]]:
    """``n`` more patients per class: three in four in train, the rest in test (for tiny training runs)."""
    out = []
    for i in range(n):
        split = "test" if i % 4 == 3 else "train"
        out.append((split, "NORMAL", f"IM-{2000 + i:04d}-0001.jpeg"))
        out.append((split, "PNEUMONIA", f"person{2000 + i}_{'virus' if i % 3 == 0 else 'bacteria'}_{5000 + i}.jpeg"))
    return out


def make_kermany(root: Path, *, extra_patients: int = 0, inner: str = "chest_xray") -> Path:
    """The Kaggle zip as extracted into ``root``: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``, plus its
    duplicate ``chest_xray/chest_xray/`` tree and ``__MACOSX/`` forks (which must be ignored).

    Args:
        root: the folder to write into (the ROOT a user passes).
        extra_patients: more patients per class for tiny training runs (:func:`kermany_extra_files`).
        inner: the name of the top folder (``chest_xray``).
    """
    base = root / inner
    for i, (split, cls, name) in enumerate([*KERMANY_FILES, *kermany_extra_files(extra_patients)]):
        write_jpeg(base / split / cls / name, seed=i, positive=cls == "PNEUMONIA")
    write_jpeg(base / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg", seed=99)
    write_jpeg(base / "chest_xray" / "test" / "PNEUMONIA" / "person100_bacteria_475.jpeg", seed=98, positive=True)
    fork = root / "__MACOSX" / inner / "train" / "NORMAL" / "._IM-0115-0001.jpeg"
    fork.parent.mkdir(parents=True, exist_ok=True)
    fork.write_bytes(b"\x00\x05\x16\x07 not an image")
    (base / "train" / "NORMAL" / "._IM-0117-0001.jpeg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (base / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


# --------------------------------------------------------------------------------------------------- RSNA

RSNA_HEADER = ["patientId", "x", "y", "width", "height", "Target"]
RSNA_IDS = {
    "normal": "0a1b2c3d-1111-4e49-80ba-63a80b6bd001",
    "not_normal": "0a1b2c3d-2222-42f4-b0ab-c148ed324002",
    "two_boxes": "0a1b2c3d-3333-4b36-a041-de91049b9003",
    "one_box": "0a1b2c3d-4444-4b38-8475-49f4573b2004",
    "missing": "0a1b2c3d-5555-48d4-8580-5c89c4f01005",
    "old": "0a1b2c3d-6666-4d0e-9b1a-0c4f6e8a7006",
}
#: patientId -> (PatientSex, PatientAge, ViewPosition) as written in the DICOM header ("" = element absent).
RSNA_HEADERS = {
    RSNA_IDS["normal"]: ("F", "51", "PA"),
    RSNA_IDS["not_normal"]: ("M", "048Y", "AP"),
    RSNA_IDS["two_boxes"]: ("M", "63", "AP"),
    RSNA_IDS["one_box"]: ("F", "7", "PA"),
    RSNA_IDS["old"]: ("", "148", "PA"),  # RSNA has a few impossible ages: read as unknown
}
#: patientId -> (Pneumonia, boxes, detailed class, sex, age, view) expected in the prepared CSV.
RSNA_EXPECTED = {
    RSNA_IDS["normal"]: (0.0, 0, "Normal", "F", 51.0, "PA"),
    RSNA_IDS["not_normal"]: (0.0, 0, "No Lung Opacity / Not Normal", "M", 48.0, "AP"),
    RSNA_IDS["two_boxes"]: (1.0, 2, "Lung Opacity", "M", 63.0, "AP"),
    RSNA_IDS["one_box"]: (1.0, 1, "Lung Opacity", "F", 7.0, "PA"),
    RSNA_IDS["old"]: (0.0, 0, "Normal", "", float("nan"), "PA"),
}


def rsna_extra_ids(n: int) -> list[str]:
    return [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, n + 1)]


def make_rsna(root: Path, *, extra_images: int = 0, detailed: bool = True) -> Path:
    """Kaggle's stage 2 files: box rows (two for one image, blank boxes for Target 0), the detailed class file,
    ``stage_2_train_images/<patientId>.dcm`` (one listed image missing), an unlisted test image."""
    ids = RSNA_IDS
    rows: list[list[object]] = [
        [ids["normal"], "", "", "", "", 0],
        [ids["not_normal"], "", "", "", "", 0],
        [ids["two_boxes"], 264.0, 152.0, 213.0, 379.0, 1],
        [ids["two_boxes"], 562.0, 152.0, 256.0, 453.0, 1],
        [ids["one_box"], 323.0, 577.0, 160.0, 104.0, 1],
        [ids["missing"], "", "", "", "", 0],
        [ids["old"], "", "", "", "", 0],
    ]
    classes = [[ids["normal"], "Normal"], [ids["not_normal"], "No Lung Opacity / Not Normal"],
               [ids["two_boxes"], "Lung Opacity"], [ids["two_boxes"], "Lung Opacity"],
               [ids["one_box"], "Lung Opacity"], [ids["missing"], "Normal"], [ids["old"], "Normal"]]
    headers = dict(RSNA_HEADERS)
    for i, pid in enumerate(rsna_extra_ids(extra_images)):
        positive = i % 2 == 1
        rows.append([pid, 300.0, 300.0, 100.0, 120.0, 1] if positive else [pid, "", "", "", "", 0])
        classes.append([pid, "Lung Opacity" if positive else "Normal"])
        headers[pid] = ("F" if i % 3 else "M", str(30 + i), "PA" if i % 4 else "AP")
    _write_csv(root / "stage_2_train_labels.csv", RSNA_HEADER, rows)
    if detailed:
        _write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    targets = {r[0]: r[5] for r in rows}
    for i, (pid, (sex, age, view)) in enumerate(headers.items()):
        write_xray_dicom(root / "stage_2_train_images" / f"{pid}.dcm", seed=i, positive=targets[pid] == 1,
                         patient_id=pid, sex=sex or None, age=age or None, view=view or None)
    write_xray_dicom(root / "stage_2_test_images" / "0f0f0f0f-7777-4000-8000-000000000007.dcm", seed=50,
                     patient_id="0f0f0f0f-7777-4000-8000-000000000007")
    return root


# -------------------------------------------------------------------------------------------------- VinDr

#: The 28 label columns of ``image_labels_train.csv`` (the test file spells the 27th ``Other disease``).
VINDR_LABELS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]
VINDR_IDS = {"cardio": "000434271f63a053c4128a0ba6352c7f", "clear": "00053190460d56c53cc3e57321387478",
             "effusion": "0005e8e3701dfb1dd93d53e2ff537b6e", "missing": "0006e0a85696f6bb578e84fafa9a5607",
             "pneumonia": "002a34c58c5b758217ed1f584ccbcfe9", "test_clear": "004f33259ee4aef671c2b95d54e4be68"}
#: image id -> (sex, age, view) written in the DICOM header ("" = element absent).
VINDR_HEADERS = {
    VINDR_IDS["cardio"]: ("F", "061Y", ""),
    VINDR_IDS["clear"]: ("M", "", ""),
    VINDR_IDS["effusion"]: ("O", "045Y", "PA"),
    VINDR_IDS["pneumonia"]: ("M", "033Y", ""),
    VINDR_IDS["test_clear"]: ("F", "070Y", ""),
}


def _vindr_row(positives: set[str], labels: list[str]) -> list[int]:
    return [1 if name in positives else 0 for name in labels]


def make_vindr(root: Path, *, test: bool = True) -> Path:
    """PhysioNet 1.0.0: ``annotations/image_labels_{train,test}.csv`` (three readers per training image, one
    consensus row per test image), ``train/<id>.dicom``, ``test/<id>.dicom``; one listed image missing."""
    ids = VINDR_IDS
    readers = {
        ids["cardio"]: [{"No finding"}, {"No finding"}, {"Cardiomegaly", "Aortic enlargement"}],
        ids["clear"]: [{"No finding"}, {"No finding"}, {"No finding"}],
        ids["effusion"]: [{"Pleural effusion", "Rib fracture"}, {"Pleural effusion"},
                          {"Pleural effusion", "Nodule/Mass", "Other diseases"}],
        ids["missing"]: [{"No finding"}, {"No finding"}, {"No finding"}],
    }
    rows = []
    for image_id, sets in readers.items():
        for rad, positives in zip(("R8", "R9", "R10"), sets, strict=True):
            rows.append([image_id, rad, *_vindr_row(positives, VINDR_LABELS)])
    _write_csv(root / "annotations" / "image_labels_train.csv", ["image_id", "rad_id", *VINDR_LABELS], rows)
    if test:
        test_labels = [*VINDR_LABELS[:-2], "Other disease", "No finding"]
        test_rows = [[ids["pneumonia"], *_vindr_row({"Pneumonia", "Lung Opacity", "Consolidation", "Other disease"},
                                                    test_labels)],
                     [ids["test_clear"], *_vindr_row({"No finding"}, test_labels)]]
        _write_csv(root / "annotations" / "image_labels_test.csv", ["image_id", *test_labels], test_rows)
    for i, (image_id, (sex, age, view)) in enumerate(VINDR_HEADERS.items()):
        split = "test" if image_id in (ids["pneumonia"], ids["test_clear"]) else "train"
        if split == "test" and not test:
            continue
        write_xray_dicom(root / split / f"{image_id}.dicom", seed=i, patient_id=image_id, sex=sex or None,
                         age=age or None, view=view or None)
    return root


# ----------------------------------------------------------------------------------------------- PadChest

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_HEADER = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]
#: Free text that must never reach the prepared CSV.
PADCHEST_REPORT = "CANARYREPORT informe sin hallazgos"

#: (ImageID, ImageDir, StudyDate, StudyID, PatientID, PatientBirth, sex, ViewPosition_DICOM, Projection,
#: MethodLabel, Labels) of the replica's rows.
PADCHEST_ROWS = (
    ("216840111366964012283393834152009027091819347_00-165-172.png", "0", "20090127", "st1", "pat1", "1948.0", "F",
     "POSTEROANTERIOR", "PA", "Physician", "['normal']"),
    ("216840111366964012283393834152009027091952283_00-165-137.png", "0", "20090127", "st1", "pat1", "1948.0", "F",
     "LATERAL", "L", "Physician", "['normal']"),
    ("216840111366964012339356563862009068104541212_00-047-001.png", "1", "20120308", "st2", "pat1", "1948.0", "F",
     "POSTEROANTERIOR", "PA", "RNN_model", "['pneumonia', 'pleural effusion', ' callus rib fracture', '']"),
    ("216840111366964012373310883942009117084022290_00-064-025.png", "1", "20090427", "st3", "pat2", "1930.0", "M",
     "", "AP_horizontal", "Physician", "['pseudonodule', 'subcutaneous emphysema', 'cardiomegaly']"),
    ("216840111366964012487858717522009280135853083_00-075-001.png", "2", "20091007", "st4", "pat3", "1975.0", "M",
     "ANTEROPOSTERIOR", "AP", "RNN_model", ""),
    ("216840111366964012558082906712009327122220177_00-102-064.png", "2", "20091123", "st5", "pat3", "1975.0", "M",
     "POSTEROANTERIOR", "PA", "RNN_model", "['exclude']"),
    ("216840111366964012819207061112010281134410801_00-129-131.png", "2", "20101008", "st6", "pat4", "", "O",
     "POSTEROANTERIOR", "PA", "Physician", "['infiltrates', 'air bronchogram', 'hiatal hernia', 'NSG tube']"),
    ("216840111366964012959786098432011033083840143_00-176-115.png", "3", "20110202", "st7", "pat5", "1960.0", "F",
     "POSTEROANTERIOR", "PA", "RNN_model", "['copd signs']"),  # listed, not on disk
    ("216840111366964012989926673512011074122523403_00-163-058.png", "3", "20110315", "st8", "pat6", "1981.0", "F",
     "POSTEROANTERIOR", "PA", "RNN_model", "['pneumonia'"),  # unparseable
)
PADCHEST_MISSING = f"3/{PADCHEST_ROWS[7][0]}"


def make_padchest(root: Path, *, flat: bool = False) -> Path:
    """The labels CSV (every column of the release, free-text report included) and ``<ImageDir>/<ImageID>`` 16-bit
    PNGs (all in ROOT with ``flat``); the eighth listed image is missing on disk."""
    rows = []
    for i, (image_id, image_dir, date, study, patient, birth, sex, vp, proj, method, labels) in enumerate(
            PADCHEST_ROWS):
        values = dict.fromkeys(PADCHEST_HEADER, "")
        values.update({"ImageID": image_id, "ImageDir": image_dir, "StudyDate_DICOM": date, "StudyID": study,
                       "PatientID": patient, "PatientBirth": birth, "PatientSex_DICOM": sex,
                       "ViewPosition_DICOM": vp, "Projection": proj, "MethodProjection": "Manual review of DICOM",
                       "Pediatric": "No", "Modality_DICOM": "CR", "ReportID": str(4000 + i),
                       "Report": PADCHEST_REPORT, "MethodLabel": method, "Labels": labels})
        rows.append([values[c] for c in PADCHEST_HEADER])
        if i != 7:
            write_png(root / ("" if flat else image_dir) / image_id, seed=i, bits=16, positive="pneumonia" in labels)
    _write_csv(root / PADCHEST_CSV, PADCHEST_HEADER, rows)
    return root


# -------------------------------------------------------------------------------------------------- COVID

COVID_HEADER = [
    "patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "intubated",
    "intubation_present", "went_icu", "in_icu", "needed_supplemental_O2", "extubated", "temperature",
    "pO2_saturation", "leukocyte_count", "neutrophil_count", "lymphocyte_count", "view", "modality", "date",
    "location", "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
]
COVID_NOTE = "CANARYNOTE a 65-year-old man with fever"
#: (patientid, offset, sex, age, finding, view, modality, location, folder, filename, license)
COVID_ROWS = (
    ("2", "0", "M", "65", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "Cho Ray Hospital, Ho Chi Minh City, Vietnam",
     "images", "auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg", ""),
    ("2", "3", "M", "65", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray",
     "Cho Ray Hospital, Ho Chi Minh City, Vietnam", "images", "auntminnie-b-2020_01_28_Vietnam_coronavirus.jpeg", ""),
    ("3", "4", "M", "74", "Pneumonia/Viral/SARS", "AP", "X-ray", "Mount Sinai Hospital, Toronto, Ontario, Canada",
     "images", "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg", ""),
    ("5", "", "", "", "Pneumonia", "PA", "X-ray", "", "images", "ARDSSevere.png", "CC BY-SA"),
    ("6", "", "F", "40", "Pneumonia/Bacterial/Streptococcus", "L", "X-ray", "", "images", "strep-lateral.jpg",
     "CC BY-NC-SA"),
    ("7", "", "F", "33", "No Finding", "PA", "X-ray", "", "images", "normal-chest.jpg", "Apache 2.0"),
    ("8", "", "M", "", "todo", "PA", "X-ray", "", "images", "pending-review.png", "CC BY"),
    ("9", "0", "F", "52", "Pneumonia/Viral/COVID-19", "Axial", "CT", "", "volumes", "coronacases_org_001.nii.gz",
     "CC BY-NC-SA"),
    ("10", "", "M", "28", "Tuberculosis", "PA", "X-ray", "", "images", "tb-case.png", "CC BY"),
    ("11", "", "F", "70", "Pneumonia/Viral/Herpes ", "PA", "X-ray", "", "images", "herpes-missing.jpg", "CC BY"),
    ("12", "", "F", "61", "Pneumonia/Fungal/Pneumocystis", "PA", "X-ray", "", "images", "pcp.jpeg", "CC BY-NC-ND"),
)
COVID_MISSING = "images/herpes-missing.jpg"


def make_covid(root: Path) -> Path:
    """A clone of ieee8023/covid-chestxray-dataset: ``metadata.csv`` (every column, each line ending in a comma
    as in the repository, clinical notes included), ``images/`` (one listed image missing), a CT volume row."""
    rows = []
    for i, (pid, offset, sex, age, finding, view, modality, location, folder, filename, lic) in enumerate(
            COVID_ROWS):
        values = dict.fromkeys(COVID_HEADER, "")
        values.update({"patientid": pid, "offset": offset, "sex": sex, "age": age, "finding": finding,
                       "RT_PCR_positive": "Y" if "COVID" in finding else "", "view": view, "modality": modality,
                       "date": "January 22, 2020", "location": location, "folder": folder, "filename": filename,
                       "doi": "10.1056/nejmc2001272", "url": "https://example.org/case", "license": lic,
                       "clinical_notes": COVID_NOTE})
        rows.append([values[c] for c in COVID_HEADER])
        path = root / folder / filename
        if modality != "X-ray" or f"{folder}/{filename}" == COVID_MISSING:
            continue
        (write_png if filename.endswith(".png") else write_jpeg)(path, seed=i, positive=finding != "No Finding")
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    (root / "volumes" / "coronacases_org_001.nii.gz").write_bytes(b"not read")
    _write_csv(root / "metadata.csv", COVID_HEADER, rows, trailing_comma=True)
    return root
