"""Small replicas of the NIH ChestX-ray14, CheXpert and MIMIC-CXR-JPG layouts, as distributed.

Same file names, same CSV headers and value conventions as the real files (header lines copied from the
releases), a few rows each with the awkward cases: ``No Finding``, ``-1``, blanks, lateral views, patients with
several studies, ages over 120 in the 2017 NIH file, one listed image missing on disk. Images are tiny real
PNG/JPEG files. ``extra_patients`` adds plain generated patients so a tiny training run has enough cases.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.factories import chest_like

SIZE = 48

# ------------------------------------------------------------------------------------------------------ NIH

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")

#: (image, finding labels, follow-up, patient, age, sex, view, archive folder or None = missing on disk, test?)
NIH_ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, "57", "M", "PA", "images_001", False),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, "58", "M", "PA", "images_001", False),
    ("00000001_002.png", "Cardiomegaly|Effusion", 2, 1, "58", "M", "PA", "images_001", False),
    ("00000002_000.png", "No Finding", 0, 2, "81", "M", "PA", "images_001", False),
    ("00000003_000.png", "Hernia", 0, 3, "413", "F", "PA", "images_001", False),  # 2017 file: > 120
    ("00000003_001.png", "Hernia|Infiltration", 1, 3, "74", "F", "AP", "images_002", False),
    ("00000004_000.png", "Mass|Nodule", 0, 4, "82", "M", "AP", "images_002", False),
    ("00000005_000.png", "No Finding", 0, 5, "69", "F", "PA", "images_002", True),
    ("00000005_001.png", "Pleural_Thickening|Pneumothorax", 1, 5, "69", "F", "PA", "images_002", True),
    ("00000006_000.png", "Atelectasis|Consolidation|Edema|Fibrosis|Pneumonia", 0, 6, "12", "M", "AP", "images_002",
     True),
    ("00000007_000.png", "Effusion", 0, 7, "40", "F", "PA", None, False),  # listed, not on disk
]

#: Findings given to generated patients in turn (each appears in train and test).
_NIH_EXTRA = ("No Finding", "Effusion", "Cardiomegaly", "No Finding", "Atelectasis|Effusion", "Cardiomegaly|Mass")


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    return (chest_like(size, seed=seed, dtype=np.float64, max_value=1.0) * 255).astype(np.uint8)


def _save(path: Path, seed: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(seed)).save(path, format=fmt)


def make_nih(root: Path, *, version: str = "2020", extra_patients: int = 0, lists: bool = True,
             missing: bool = True) -> Path:
    """NIH ChestX-ray14: ``Data_Entry_2017[_v2020].csv``, the split lists and ``images_00N/images/*.png``.

    Args:
        root: the folder to write (the dataset's ROOT).
        version: ``2020`` writes ``Data_Entry_2017_v2020.csv`` (ages fixed: 413 -> 74); ``2017`` writes
            ``Data_Entry_2017.csv`` with its trailing comma on every line and the age 413.
        extra_patients: generated patients 100.. with one or two images each (every fourth one in test).
        lists: write ``train_val_list.txt`` and ``test_list.txt``.
        missing: keep the row whose image is not on disk (``00000007_000.png``).
    """
    rows = [r for r in NIH_ROWS if missing or r[7] is not None]
    for k in range(extra_patients):
        pid = 100 + k
        for f in range(1 + k % 2):
            rows.append((f"{pid:08d}_{f:03d}.png", _NIH_EXTRA[(k + f) % len(_NIH_EXTRA)], f, pid, str(30 + k % 50),
                         "MF"[k % 2], "PA" if k % 3 else "AP", "images_003", k % 4 == 0))
    trail = "," if version == "2017" else ""
    lines = [NIH_HEADER + trail]
    for i, (image, labels, follow, pid, age, sex, view, folder, _test) in enumerate(rows):
        if version == "2020" and age == "413":
            age = "74"
        lines.append(f"{image},{labels},{follow},{pid},{age},{sex},{view},2500,2048,0.143,0.143{trail}")
        if folder is not None:
            _save(root / folder / "images" / image, i, "PNG")
    name = "Data_Entry_2017_v2020.csv" if version == "2020" else "Data_Entry_2017.csv"
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\n".join(lines) + "\n")
    if lists:
        (root / "test_list.txt").write_text("".join(f"{r[0]}\n" for r in rows if r[8]))
        (root / "train_val_list.txt").write_text("".join(f"{r[0]}\n" for r in rows if not r[8]))
    return root


# ------------------------------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,"
                   "Pleural Other,Fracture,Support Devices")
CHEXPERT_FINDINGS = tuple(CHEXPERT_HEADER.split(",")[5:])
RELEASE = "CheXpert-v1.0-small"

#: (path under train/ or valid/, sex, age, frontal/lateral, AP/PA, the 14 values as in the file, on disk?)
CHEXPERT_TRAIN = [
    # No Finding with blanks elsewhere (blank pathologies -> 0, Support Devices stays as given)
    ("patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP",
     "1.0,,,,,,,,,0.0,,,,1.0", True),
    # uncertain -1 and blanks, a patient with two studies, one of them with a lateral view
    ("patient00002/study2/view1_frontal.jpg", "Female", "87", "Frontal", "AP",
     ",,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,", True),
    ("patient00002/study1/view1_frontal.jpg", "Female", "83", "Frontal", "AP",
     ",,,1.0,,,-1.0,,,,,,1.0,", True),
    ("patient00002/study1/view2_lateral.jpg", "Female", "83", "Lateral", "",
     ",,,1.0,,,,,,,,,1.0,", True),
    ("patient00003/study1/view1_frontal.jpg", "Male", "41", "Frontal", "AP",
     ",,,,,1.0,,,,0.0,,,,", True),
    ("patient00004/study1/view1_frontal.jpg", "Unknown", "20", "Frontal", "PA",
     "1.0,0.0,,,,,,,,0.0,,,,0.0", True),
    ("patient00005/study1/view1_frontal.jpg", "Male", "51", "Frontal", "PA",
     ",,1.0,,,,,,,,1.0,,,", False),  # listed, not on disk
]
CHEXPERT_VALID = [
    ("patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP",
     "0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0", True),
    ("patient64542/study1/view1_frontal.jpg", "Male", "70", "Frontal", "PA",
     "0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,1.0", True),
    ("patient64542/study1/view2_lateral.jpg", "Male", "70", "Lateral", "",
     "0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,1.0", True),
]
#: The 14 values given to generated patients in turn.
_CHEXPERT_EXTRA = (
    "1.0,,,,,,,,,0.0,,,,",
    ",,1.0,1.0,,,,,,,1.0,,,1.0",
    ",,,1.0,,1.0,,,1.0,,-1.0,,,",
    ",,1.0,,,,,,,0.0,1.0,,,",
)


def make_chexpert(root: Path, *, extra_patients: int = 0, missing: bool = True, test_labels: bool = False,
                  nested: bool = True) -> Path:
    """CheXpert-v1.0-small: ``train.csv``, ``valid.csv``, ``train/patientNNNNN/studyN/viewN_*.jpg``.

    Args:
        root: the folder to write; the release folder ``CheXpert-v1.0-small`` goes inside it when ``nested``
            (the ``Path`` column names it either way, as in the real files).
        extra_patients: generated patients 10000.. with one frontal image each.
        missing: keep the row whose image is not on disk (``patient00005``).
        test_labels: also write ``test_labels.csv`` (CheXlocalize's test labels, 0/1 only, ``Path`` under
            ``test/``) and its images.

    Returns:
        The folder holding ``train.csv`` (``root/CheXpert-v1.0-small`` when nested, else ``root``).
    """
    base = root / RELEASE if nested else root
    train = [r for r in CHEXPERT_TRAIN if missing or r[6]]
    train += [(f"patient{10000 + k:05d}/study1/view1_frontal.jpg", ("Male", "Female")[k % 2],
               str(30 + k % 50), "Frontal", "PA" if k % 3 else "AP", _CHEXPERT_EXTRA[k % len(_CHEXPERT_EXTRA)], True)
              for k in range(extra_patients)]
    seed = 0
    for name, rows, folder in (("train.csv", train, "train"), ("valid.csv", CHEXPERT_VALID, "valid")):
        lines = [CHEXPERT_HEADER]
        for path, sex, age, side, appa, values, on_disk in rows:
            lines.append(f"{RELEASE}/{folder}/{path},{sex},{age},{side},{appa},{values}")
            if on_disk:
                _save(base / folder / path, seed, "JPEG")
            seed += 1
        base.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("\n".join(lines) + "\n")
    if test_labels:
        header = "Path," + ",".join(CHEXPERT_FINDINGS)
        rows = [("patient64741/study1/view1_frontal.jpg", "0,0,1,1,0,0,0,0,0,0,1,0,0,1"),
                ("patient64741/study1/view2_lateral.jpg", "0,0,1,1,0,0,0,0,0,0,1,0,0,1"),
                ("patient64742/study1/view1_frontal.jpg", "1,0,0,0,0,0,0,0,0,0,0,0,0,0")]
        (base / "test_labels.csv").write_text(header + "\n" + "".join(f"test/{p},{v}\n" for p, v in rows))
        for path, _ in rows:
            _save(base / "test" / path, seed, "JPEG")
            seed += 1
    return base


# ---------------------------------------------------------------------------------------------------- MIMIC

MIMIC_LABEL_HEADER = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                      "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
                      "Pneumothorax,Support Devices")
MIMIC_META_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                     "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                     "PatientOrientationCodeSequence_CodeMeaning")
MIMIC_SPLIT_HEADER = "dicom_id,study_id,subject_id,split"

#: (subject, study, the 14 values in the file's (alphabetical) order), as in mimic-cxr-2.0.0-chexpert.csv
MIMIC_LABELS = [
    ("10000032", "50414267", ",,,,,,,,1.0,,,,,"),                   # No Finding, blanks elsewhere
    ("10000032", "53189527", ",-1.0,,1.0,,,,,,0.0,,,,1.0"),          # uncertain cardiomegaly, edema
    ("10000764", "57375967", ",,1.0,,,,,,,,,-1.0,,"),                # consolidation, uncertain pneumonia
    ("10000898", "50771383", "1.0,,,,,,,1.0,,1.0,,,0.0,"),           # atelectasis, opacity, effusion
]
#: (dicom_id, subject, study, ViewPosition, split, on disk?)
MIMIC_IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "train", True),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "train", True),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", "train", True),
    ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "10000764", "57375967", "AP", "validate", True),
    ("4e1ba7e0-3b2f1dc1-5e0c4d6f-2b9e1a3f-6c7d8e9f", "10000764", "57375967", "", "validate", False),
    ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "10000898", "50771383", "PA", "test", True),
    ("b79e55c3-735ce5ac-64412506-cdc9ea79-f1af521f", "10000898", "50771383", "LL", "test", True),
    ("8f2d5c1a-0b7e4e3d-9a6c2b1f-4d3e5a6b-7c8d9e0f", "10000935", "51178377", "PA", "train", True),  # no labels
]


def _gz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as fh:
        fh.write(text.encode())
    path.write_bytes(buf.getvalue())


def make_mimic(root: Path, *, gzipped: bool = True, labeler: str = "chexpert", missing: bool = True) -> Path:
    """MIMIC-CXR-JPG 2.0.0: the three CSVs (gzipped as distributed) and ``files/p1N/pNNNNNNNN/sNNNNNNNN/*.jpg``.

    Args:
        root: the folder to write (``mimic-cxr-jpg/2.0.0``).
        gzipped: write ``.csv.gz`` (as on PhysioNet) or plain ``.csv``.
        labeler: ``chexpert`` or ``negbio`` (the label file's name).
        missing: keep the image not on disk (``4e1ba7e0...``, the second image of study 57375967).
    """
    images = [r for r in MIMIC_IMAGES if missing or r[5]]
    labels = MIMIC_LABEL_HEADER + "\n" + "".join(f"{s},{t},{v}\n" for s, t, v in MIMIC_LABELS)
    meta = MIMIC_META_HEADER + "\n" + "".join(
        f"{d},{s},{t},CHEST (PA AND LAT),{v},3056,2544,21800506,213014.531,CHEST (PA AND LAT),"
        f"{'lateral' if v in ('LATERAL', 'LL') else 'postero-anterior'},Erect\n" for d, s, t, v, _, _ in images)
    split = MIMIC_SPLIT_HEADER + "\n" + "".join(f"{d},{t},{s},{sp}\n" for d, s, t, _, sp, _ in images)
    root.mkdir(parents=True, exist_ok=True)
    for stem, text in ((labeler, labels), ("metadata", meta), ("split", split)):
        name = f"mimic-cxr-2.0.0-{stem}.csv"
        if gzipped:
            _gz(root / f"{name}.gz", text)
        else:
            (root / name).write_text(text)
    for i, (d, s, t, _, _, on_disk) in enumerate(images):
        if on_disk:
            _save(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg", 100 + i, "JPEG")
    return root
