"""ScanDataset, its pickle-free disk cache, make_loader, warm_cache and preprocess, on real small files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import medtransfer.data.dataset as dataset_mod
from medtransfer.config import AugmentConfig
from medtransfer.data.dataset import ScanDataset, make_loader, preprocess, spec_digest, warm_cache
from medtransfer.data.manifest import Manifest
from medtransfer.data.spec import InputSpec
from medtransfer.errors import ScanReadError
from tests.factories import chest_like, write_dicom, write_png

SPEC = InputSpec(size=(32, 32))


def _manifest(root: Path, n: int = 5, task: str = "binary") -> Manifest:
    rows = []
    for i in range(n):
        if i == 1:
            write_png(root / f"c{i}.png", chest_like(40, seed=i, dtype=np.uint8, max_value=255))
            path, fmt = f"c{i}.png", "png"
        else:
            write_dicom(root / f"c{i}.dcm", chest_like(48, seed=i), photometric="MONOCHROME1" if i == 2 else "MONOCHROME2")
            path, fmt = f"c{i}.dcm", "dicom"
        rows.append({"case_id": f"case{i}", "patient_key": f"p{i}", "path": path, "files": "", "format": fmt,
                     "split": "train", "sex": "F" if i % 2 else None, "age_band": "40-59", "site": "A",
                     "label": ["normal", "pneumonia", "covid"][i % (3 if task == "multiclass" else 2)],
                     "effusion": [1, 0, None][i % 3], "nodule": [0, None, 1][i % 3]})
    classes = {"binary": ["normal", "pneumonia"], "multiclass": ["normal", "pneumonia", "covid"],
               "multilabel": ["effusion", "nodule"]}[task]
    return Manifest(pd.DataFrame(rows), classes, task, root)  # type: ignore[arg-type]


@pytest.fixture
def counting(monkeypatch):
    calls = []
    real = dataset_mod.read_scan  # the dataset decodes with read_scan (the public reader)

    def fake(paths, spec, **kwargs):
        calls.append(kwargs.get("fmt"))
        return real(paths, spec, **kwargs)

    monkeypatch.setattr(dataset_mod, "read_scan", fake)
    return calls


def test_batch_equals_stacked_items(tmp_path):
    ds = ScanDataset(_manifest(tmp_path), SPEC)
    batch = next(iter(make_loader(ds, batch_size=4, shuffle=False)))
    items = [ds[i] for i in range(4)]
    torch.testing.assert_close(batch["image"], torch.stack([it["image"] for it in items]))
    torch.testing.assert_close(batch["label"], torch.stack([it["label"] for it in items]))
    assert batch["case_id"] == [it["case_id"] for it in items] == ["case0", "case1", "case2", "case3"]
    assert batch["sex"] == ["", "F", "", "F"] and batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32


def test_second_epoch_and_second_run_skip_decoding(tmp_path, counting):
    man = _manifest(tmp_path / "data")
    ds = ScanDataset(man, SPEC, cache_dir=tmp_path / "cache")
    first = [ds[i]["image"] for i in range(len(ds))]
    assert len(counting) == 5 and ds.decode_count == 5
    second = [ds[i]["image"] for i in range(len(ds))]
    rerun = ScanDataset(man, SPEC, cache_dir=tmp_path / "cache")
    third = [rerun[i]["image"] for i in range(len(rerun))]
    assert len(counting) == 5 and rerun.decode_count == 0
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_cache_files_are_plain_npy(tmp_path):
    ds = ScanDataset(_manifest(tmp_path / "data"), SPEC, cache_dir=tmp_path / "cache")
    warm_cache(ds)
    folder = tmp_path / "cache" / spec_digest(SPEC)
    files = sorted(folder.glob("*.npy"))
    assert len(files) == 5 and (folder / "spec.json").is_file()
    for f in files:
        arr = np.load(f, allow_pickle=False)
        # integer pixels, never pickled objects (the bit depth is tested below)
        assert arr.dtype in (np.uint8, np.uint16) and arr.shape == (1, 32, 32) and arr.max() > 0
    assert not list(folder.glob(".tmp-*"))


def test_cache_stores_8bit_scans_as_uint8_and_deeper_ones_as_uint16_within_half_a_level(tmp_path):
    """The cache is 4x (2x) smaller than float32, and the pixels every pass sees are within half a grey level
    of the float decode-and-resize; preprocess() (ad-hoc prediction) gives exactly the dataset's pixels."""
    from medtransfer.data.dataset import resize_transforms
    from medtransfer.data.loading import load_case

    root = tmp_path / "data"
    write_png(root / "eight.png", chest_like(40, seed=1, dtype=np.uint8, max_value=255))
    write_dicom(root / "twelve.dcm", chest_like(48, seed=2))  # 12-bit stored values
    df = pd.DataFrame({"case_id": ["a", "b"], "patient_key": ["a", "b"], "path": ["eight.png", "twelve.dcm"],
                       "files": ["", ""], "format": ["png", "dicom"], "label": ["x", "y"], "split": "train"})
    man = Manifest(df, ["x", "y"], "binary", root)
    ds = ScanDataset(man, SPEC, cache_dir=tmp_path / "cache")
    warm_cache(ds)
    for i, (name, dtype, levels) in enumerate([("eight.png", np.uint8, 255), ("twelve.dcm", np.uint16, 65535)]):
        fmt = "png" if name.endswith("png") else "dicom"
        exact = resize_transforms(SPEC)({"image": load_case(root / name, fmt, SPEC)})["image"].numpy()
        cached = ds.cached_image(i)
        assert np.abs(cached - exact).max() <= 0.5 / levels + 1e-6
        entry = next(p for p in (tmp_path / "cache" / spec_digest(SPEC)).glob("*.npy")
                     if np.load(p).dtype == dtype)
        assert entry.stat().st_size < exact.nbytes / (4 if dtype == np.uint8 else 2) + 256
        assert torch.equal(preprocess(root / name, SPEC), ds[i]["image"])
    # the same pixels without a cache: a cache never changes a result
    bare = ScanDataset(man, SPEC)
    assert all(np.array_equal(bare.cached_image(i), ds.cached_image(i)) for i in range(2))


def test_cache_invalidation_on_spec_and_file_change(tmp_path, counting):
    man = _manifest(tmp_path / "data", n=2)
    warm_cache(ScanDataset(man, SPEC, cache_dir=tmp_path / "cache"))
    assert len(counting) == 2
    # mean/std are applied after the cache: same entries
    warm_cache(ScanDataset(man, SPEC.model_copy(update={"mean": (0.5,), "std": (0.25,)}), cache_dir=tmp_path / "cache"))
    assert len(counting) == 2
    warm_cache(ScanDataset(man, InputSpec(size=(32, 32), window="minmax"), cache_dir=tmp_path / "cache"))
    assert len(counting) == 4
    path = tmp_path / "data" / "c0.dcm"
    write_dicom(path, chest_like(48, seed=99))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # filesystems with coarse mtimes
    ds = ScanDataset(man, SPEC, cache_dir=tmp_path / "cache")
    warm_cache(ds)
    assert len(counting) == 5 and ds.decode_count == 1


def test_corrupt_cache_entry_is_decoded_again(tmp_path, counting, caplog):
    man = _manifest(tmp_path / "data", n=1)
    ds = ScanDataset(man, SPEC, cache_dir=tmp_path / "cache")
    expected = ds[0]["image"]
    entry = next((tmp_path / "cache" / spec_digest(SPEC)).glob("*.npy"))
    entry.write_bytes(b"garbage")
    again = ScanDataset(man, SPEC, cache_dir=tmp_path / "cache")
    assert torch.equal(again[0]["image"], expected) and again.decode_count == 1
    assert "unreadable cache entry" in caplog.text


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_labels(tmp_path, task):
    ds = ScanDataset(_manifest(tmp_path, n=3, task=task), SPEC)
    labels = [ds[i]["label"] for i in range(3)]
    if task == "binary":
        assert all(lab.dtype == torch.float32 and lab.shape == () for lab in labels)
        assert [float(lab) for lab in labels] == [0.0, 1.0, 0.0]
    elif task == "multiclass":
        assert all(lab.dtype == torch.long for lab in labels) and [int(lab) for lab in labels] == [0, 1, 2]
    else:
        assert all(lab.dtype == torch.float32 and lab.shape == (2,) for lab in labels)
        np.testing.assert_array_equal(torch.stack(labels).numpy(), [[1, 0], [0, np.nan], [np.nan, 1]])


def test_warm_cache_returns_failures_and_getitem_raises(tmp_path):
    man = _manifest(tmp_path / "data", n=3)
    (tmp_path / "data" / "c2.dcm").write_bytes(b"")
    man.df.loc[0, "path"] = "missing.dcm"
    ds = ScanDataset(man, SPEC, cache_dir=tmp_path / "cache")
    failures = warm_cache(ds)
    assert [i for i, _ in failures] == [0, 2]
    assert "not found" in failures[0][1] and "empty file" in failures[1][1]
    with pytest.raises(ScanReadError) as info:
        ds[2]
    assert info.value.path == "c2.dcm"  # the manifest's relative path, not an absolute one
    assert ds[1]["image"].shape == (1, 32, 32)


def test_memory_cache(tmp_path, counting):
    ds = ScanDataset(_manifest(tmp_path, n=2), SPEC, memory_cache=True)
    a = ds[0]["image"]
    b = ds[0]["image"]
    assert len(counting) == 1 and torch.equal(a, b)


def test_training_loader_is_seeded_and_augments(tmp_path):
    man = _manifest(tmp_path, n=4)
    aug = AugmentConfig(flip_prob=0.5, intensity_prob=1.0)

    def epoch(seed, workers=0):
        ds = ScanDataset(man, SPEC, train=True, augment=aug, memory_cache=True)
        loader = make_loader(ds, batch_size=2, shuffle=True, seed=seed, num_workers=workers)
        return [(b["index"].tolist(), b["image"]) for b in loader]

    a, b, c = epoch(0), epoch(0), epoch(1)
    for (ia, xa), (ib, xb) in zip(a, b, strict=True):
        assert ia == ib and torch.equal(xa, xb)
    assert any(not torch.equal(xa, xc) for (_, xa), (_, xc) in zip(a, c, strict=True))
    plain = ScanDataset(man, SPEC)
    idx, images = a[0]
    assert not torch.allclose(images[0], plain[idx[0]]["image"])
    w1, w2 = epoch(0, workers=1), epoch(0, workers=1)  # worker seeding is deterministic too
    for (ia, xa), (ib, xb) in zip(w1, w2, strict=True):
        assert ia == ib and torch.equal(xa, xb)


def test_preprocess_matches_the_eval_dataset(tmp_path):
    man = _manifest(tmp_path, n=3)
    ds = ScanDataset(man, SPEC)
    for i in range(3):
        torch.testing.assert_close(preprocess(tmp_path / man.df.loc[i, "path"], SPEC), ds[i]["image"])
    arr = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    assert preprocess(arr, SPEC).shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(arr * 10, SPEC)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScanReadError, match="not a recognised scan"):
        preprocess(tmp_path / "notes.txt", SPEC)


def test_volume_with_2d_spec_is_refused(tmp_path):
    write_dicom(tmp_path / "mf.dcm", np.stack([chest_like(16, seed=i) for i in range(3)]))
    df = pd.DataFrame([{"case_id": "v", "patient_key": "p", "path": "mf.dcm", "files": "", "format": "dicom",
                        "label": "a"}])
    ds = ScanDataset(Manifest(df, ["a", "b"], "binary", tmp_path), SPEC)
    with pytest.raises(ScanReadError, match="a volume"):
        ds[0]
    assert ScanDataset(Manifest(df, ["a", "b"], "binary", tmp_path), InputSpec(size=(8, 16, 16)))[0]["image"].shape \
        == (1, 8, 16, 16)
