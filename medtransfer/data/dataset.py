"""``ScanDataset`` (decode → resize, cached on disk → [augment] → normalise), ``make_loader`` and ``preprocess``.

Cache layout: ``<cache_dir>/<spec digest>/<case key>.npy``, one array (k, *spec.size) per case (k = 1, or one
channel per CT window of ``spec.windows``), exactly what :func:`~medtransfer.data.loading.read_scan` returns
for it (decoded, oriented, resampled and resized once: volumes are never cached at their original size), plus
``spec.json`` recording what the digest stands for. Pixels are stored as integers, not float32: **uint8** when
the decoded scan holds 8-bit values (PNG, JPEG, 8-bit DICOM: 256 levels is all there is, and the resized image
is rounded to the nearest of them, an error of at most half a grey level) and **uint16** otherwise (12-16-bit
DICOM and NIfTI keep 65,536 levels after windowing, well beyond their noise). That is 4x (2x) less disk and
memory than float32 (5,856 chest X-rays at 224 px: 0.29 GB instead of 1.2 GB), and the quantised image is
what every pass sees, with or without a cache, so a cache never changes a result. The spec digest covers every
:class:`InputSpec` field that changes the cached pixels (not ``mean``/``std``/``channels``, applied after the
cache); the case key hashes each file's resolved path, size and ``mtime_ns``, so an edited or replaced file
is decoded again. Stale entries are never read, only left behind: delete the folder to reclaim space.

This is MONAI's ``PersistentDataset`` idea without its storage format: ``PersistentDataset`` writes
``torch.save`` pickles and reads them back with ``torch.load``; unpickling a file can run arbitrary code, and
the cache folder may be shared or copied between machines. Our safe-loading rule is never to unpickle, so
entries are plain ``.npy`` arrays read with ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from medtransfer import io
from medtransfer.config import AugmentConfig
from medtransfer.data.loading import read_scan, sniff_format
from medtransfer.data.manifest import SUBGROUP_COLUMNS, Manifest
from medtransfer.data.spec import InputSpec
from medtransfer.data.transforms import (
    finalise_transforms,
    random_transforms,
    resize_transforms,
)
from medtransfer.data.volumes import dims_reason
from medtransfer.data.volumes import holds_8bit_values as holds_8bit_values
from medtransfer.errors import ScanReadError
from medtransfer.progress import track

logger = logging.getLogger(__name__)

#: Bump when decoding or resizing changes its output, so that old cache entries are not reused.
CACHE_VERSION = "3"  # 2: integer pixels (uint8/uint16) instead of float32; 3: read_scan (MONAI orientation, geometry)


def spec_digest(spec: InputSpec) -> str:
    """16 hex digits naming the cache folder of ``spec`` (fields that change the cached [0, 1] image only)."""
    fields = spec.model_dump(mode="json", exclude={"mean", "std", "channels"})
    text = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ScanDataset(torch.utils.data.Dataset):
    """Cases of a :class:`Manifest` as model inputs.

    Args:
        manifest: the cases (``path``/``files``/``format`` columns locate the files).
        spec: the preprocessing.
        train: apply random augmentation (``augment``, or the :class:`AugmentConfig` defaults when None).
        augment: augmentation settings; ignored unless ``train``.
        cache_dir: where decoded, resized images are cached (see the module docstring); None = no disk cache.
        memory_cache: also keep decoded images in memory (per process; about 4 x H x W bytes per case).

    Items are dicts: ``image`` float32 tensor (spec.channels, *spec.size) ((C, D, H, W) for volumes), normalised with
    ``spec.mean``/``std``; ``label`` float32 scalar in {0, 1} (binary), int64 scalar (multiclass) or
    float32 (C,) with NaN for unknown (multilabel); ``case_id`` str; ``index`` int; and the subgroup
    fields ``sex``, ``age_band``, ``site``, ``view``, ``manufacturer`` as str ("" when missing).

    Examples:
        >>> ds = ScanDataset(manifest.split("train"), InputSpec(), train=True, cache_dir="runs/x/cache")  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([1, 224, 224])
    """

    def __init__(self, manifest: Manifest, spec: InputSpec, *, train: bool = False,
                 augment: AugmentConfig | None = None, cache_dir: str | Path | None = None,
                 memory_cache: bool = False) -> None:
        self.manifest = manifest
        self.spec = spec
        self.train = train
        self._targets = manifest.targets() if manifest.has_labels else None  # new scans to predict: none
        self._resize = resize_transforms(spec)
        self._random = random_transforms(augment or AugmentConfig(), spec.spatial_dims) if train else None
        self._finalise = finalise_transforms(spec)
        self.cache_dir = Path(cache_dir) / spec_digest(spec) if cache_dir is not None else None
        self._memory: dict[int, np.ndarray] | None = {} if memory_cache else None
        self._seed = 0  # base of the per-item augmentation seeds (set_random_state)
        self.decode_count = 0  # cache misses decoded by this process (benchmarks and tests read it)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        image = self.cached_image(i)
        data: dict[str, Any] = {"image": image}  # the transforms never write into their input
        if self._random is not None:
            # Seeded per item from (loader seed, index), not drawn from one stream: the augmentation of a case
            # is then the same whichever worker loads it, so num_workers does not change the trained weights.
            self._random.set_random_state(seed=(self._seed * 1_000_003 + i) % (2**32))
            data = self._random({"image": torch.from_numpy(image)})  # a fresh array per call (unpack_pixels)
        data = self._finalise(data)
        row = self.manifest.df.iloc[i]
        item: dict[str, Any] = {"image": data["image"], "label": self._label(i),
                                "case_id": str(row["case_id"]), "index": i}
        for name in SUBGROUP_COLUMNS:
            item[name] = _as_str(row.get(name))
        return item

    def set_random_state(self, seed: int) -> None:
        """Seed the augmentation: item ``i`` is augmented with a seed made from (``seed``, ``i``).

        ``make_loader`` calls it with the loader's seed before any worker starts, so every worker holds the
        same seed and an item's augmentation does not depend on which process loads it.
        """
        self._seed = int(seed) % (2**32)

    def cached_image(self, index: int) -> np.ndarray:
        """The deterministic part for case ``index``: float32 (k, *spec.size) in [0, 1], from cache or decoded.

        The pixels are the quantised ones the cache stores (see the module docstring), cached or not.

        Raises:
            ScanReadError: the case's files cannot be decoded (path relative to the data folder + reason).
        """
        if self._memory is not None and index in self._memory:
            return unpack_pixels(self._memory[index])
        row = self.manifest.df.iloc[index]
        files = self.manifest.abspath(row)
        path = _cache_path(self.cache_dir, files, str(row["path"])) if self.cache_dir is not None else None
        packed = _read_cache(path, self.spec) if path is not None and path.is_file() else None
        if packed is None:
            packed = self._decode(row, files)
            if path is not None:
                self._write_cache(path, packed)
        if self._memory is not None:
            self._memory[index] = packed
        return unpack_pixels(packed)

    def _decode(self, row: Any, files: list[Path]) -> np.ndarray:
        rel = str(row["path"])
        fmt = row.get("format")
        if not isinstance(fmt, str) or not fmt:
            fmt = sniff_format(files[0]) or ("dicom" if files[0].is_dir() else "")
        try:
            scan = read_scan(files, self.spec, fmt=fmt or None)
        except ScanReadError as exc:  # name the case as the manifest does (relative path), keep the reason
            raise ScanReadError(rel, exc.reason) from exc
        self.decode_count += 1
        return pack_pixels(scan.as_tensor().numpy(), eight_bit=bool(scan.meta["eight_bit"]))

    def write_cache_spec(self) -> None:
        """Write the cache folder's ``spec.json`` (what its images are) if it is not there yet."""
        if self.cache_dir is not None and not (self.cache_dir / "spec.json").is_file():
            meta = {"cache_version": CACHE_VERSION, "spec": self.spec.model_dump(mode="json")}
            io.write_json(self.cache_dir / "spec.json", meta)

    def _write_cache(self, path: Path, image: np.ndarray) -> None:
        try:
            self.write_cache_spec()
            with io.atomic_path(path, durable=False) as tmp, open(tmp, "wb") as fh:  # a cache: checked on read
                np.save(fh, image, allow_pickle=False)
        except OSError as exc:  # a full or read-only disk slows training down but must not stop it
            logger.warning("could not write the image cache in %s (%s); continuing without it", path.parent, exc)

    def _label(self, index: int) -> torch.Tensor:
        if self._targets is None:  # unlabelled cases: a placeholder that nothing learns from
            return torch.tensor(0 if self.manifest.task == "multiclass" else 0.0)
        target = self._targets[index]
        if self.manifest.task == "multiclass":
            return torch.tensor(int(target), dtype=torch.long)
        return torch.tensor(np.asarray(target, dtype=np.float32))


def _cache_path(cache_dir: Path, files: list[Path], rel: str) -> Path:
    """``<cache_dir>/<sha256(version, each file's resolved path, size, mtime_ns)[:32]>.npy``."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for f in files:
        try:
            st = f.stat()
        except OSError as exc:
            raise ScanReadError(rel, f"file not found or unreadable ({type(exc).__name__}): {f.name}") from exc
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cache_dir / f"{h.hexdigest()[:32]}.npy"


def _read_cache(path: Path, spec: InputSpec) -> np.ndarray | None:
    """A cache entry, or None (logged) when it is unreadable or does not match the spec."""
    try:
        image = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("ignoring unreadable cache entry %s (%s)", path.name, exc)
        return None
    if image.dtype not in (np.uint8, np.uint16) or image.shape != (spec.intensity_channels, *spec.size):
        logger.warning("ignoring cache entry %s with shape %s %s", path.name, image.shape, image.dtype)
        return None
    return image


def cacheable_pixels(array: np.ndarray, resize: Any) -> np.ndarray:
    """A decoded [0, 1] case resized (``resize``: :func:`resize_transforms`) and packed as the cache stores it."""
    return pack_pixels(resize({"image": array})["image"].numpy(), eight_bit=holds_8bit_values(array))


def pack_pixels(image: np.ndarray, *, eight_bit: bool) -> np.ndarray:
    """A [0, 1] float image as uint8 (``eight_bit``) or uint16, rounded to the nearest level."""
    top, dtype = (255.0, np.uint8) if eight_bit else (65535.0, np.uint16)
    return np.round(np.clip(image, 0.0, 1.0) * top).astype(dtype)


def unpack_pixels(packed: np.ndarray) -> np.ndarray:
    """uint8/uint16 pixels back to float32 in [0, 1] (float input is returned as float32)."""
    if packed.dtype == np.uint8:
        return packed.astype(np.float32) * np.float32(1 / 255)
    if packed.dtype == np.uint16:
        return packed.astype(np.float32) * np.float32(1 / 65535)
    return packed.astype(np.float32, copy=False)


def _check_dims(array: np.ndarray, spec: InputSpec, where: str) -> None:
    if array.ndim - 1 != spec.spatial_dims:
        raise ScanReadError(where, dims_reason(tuple(array.shape[1:]), spec))


def _as_str(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool, num_workers: int = 0,
                pin_memory: bool | None = None, seed: int = 0, drop_last: bool = False,
                distributed: bool = False) -> DataLoader:
    """The one place data loaders and samplers are made.

    Deterministic for a given ``seed``: the shuffling generator is seeded, and the augmentation of each item
    is seeded from (``seed``, item index), the same with any ``num_workers`` (numpy and ``random`` are
    seeded per worker by ``worker_init_fn`` for any other use). With
    ``distributed`` and an initialised process group a :class:`DistributedSampler` shards the data: call
    ``loader.sampler.set_epoch(epoch)`` every epoch. Batches are made by :func:`collate_cases`.

    Examples:
        >>> loader = make_loader(ds, batch_size=32, shuffle=True, seed=0)  # doctest: +SKIP
    """
    sampler = None
    if distributed and dist.is_available() and dist.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif distributed:
        logger.warning("distributed=True but torch.distributed is not initialised; using one process")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if hasattr(dataset, "set_random_state"):
        dataset.set_random_state(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=num_workers, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last, generator=generator, worker_init_fn=_seed_worker,
        persistent_workers=num_workers > 0, collate_fn=collate_cases,
    )


def collate_cases(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: tensors stacked along a new first axis, ints to an int64 tensor, strings to lists of str.

    The same result as torch's ``default_collate``, but in the main process CPU tensors are stacked with
    numpy: ``torch.stack`` goes through the intra-op thread pool, which on a busy CPU cost ~100 ms per
    batch of 32 x 224 px images (benchmarks/ingest.py, 2 shared cores) against ~2 ms for a plain copy.
    Worker processes keep ``default_collate`` (single-threaded there, and it writes into shared memory).
    """
    if torch.utils.data.get_worker_info() is not None:
        return default_collate(batch)
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor) and first.device.type == "cpu" and not first.requires_grad:
            out[key] = torch.from_numpy(np.stack([v.numpy() for v in values]))
        else:
            out[key] = default_collate(values)
    return out


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random from the worker's torch seed (loader seed + id).

    The dataset's augmentation is not reseeded here: it is seeded per item (see ``ScanDataset``).
    """
    info = torch.utils.data.get_worker_info()
    seed = (info.seed if info is not None else torch.initial_seed()) % (2**32)
    np.random.seed(seed)
    random.seed(seed)


def warm_cache(dataset: ScanDataset, *, progress: bool = False) -> list[tuple[int, str]]:
    """Decode every case once (filling the caches) and return the failures instead of raising.

    Returns:
        ``[(index, reason), ...]`` for the cases that could not be decoded; the training job quarantines
        them before the first epoch.
    """
    indices: Any = range(len(dataset))
    if progress:
        indices = track(indices, "decoding scans", total=len(dataset), unit="scans")
    failures: list[tuple[int, str]] = []
    for i in indices:
        try:
            dataset.cached_image(i)
        except ScanReadError as exc:
            logger.info("case %s cannot be decoded: %s", dataset.manifest.df.iloc[i]["case_id"], exc.reason)
            failures.append((i, exc.reason))
    return failures


def preprocess(paths_or_array: Path | str | Sequence[Path | str] | np.ndarray | torch.Tensor,
               spec: InputSpec) -> torch.Tensor:
    """One ad-hoc input → float32 tensor (spec.channels, *spec.size), normalised: exactly the eval pipeline.

    Args:
        paths_or_array: a file, a DICOM series (its files or folder), or an array already scaled to [0, 1]
            ((H, W), (1, H, W), (D, H, W) or (1, D, H, W)).
        spec: the model card's input spec.

    Raises:
        ScanReadError: unreadable file, unknown format, or dimensionality that does not match ``spec``.
        ValueError: an array outside [0, 1] or with non-finite values.
    """
    if isinstance(paths_or_array, (np.ndarray, torch.Tensor)):
        array = np.asarray(paths_or_array, dtype=np.float32)
        if array.ndim == spec.spatial_dims:
            array = array[None]
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("preprocess() takes arrays already scaled to [0, 1] (as load_case returns them)")
        _check_dims(array, spec, "<array>")
        # the pixels a ScanDataset sees: resized, then quantised as the cache stores them
        pixels = unpack_pixels(cacheable_pixels(array, resize_transforms(spec)))
    else:
        files = [Path(paths_or_array)] if isinstance(paths_or_array, (str, Path)) else [Path(p) for p in paths_or_array]
        scan = read_scan(files, spec)  # exactly what a ScanDataset caches (a cache never changes a result)
        pixels = unpack_pixels(pack_pixels(scan.as_tensor().numpy(), eight_bit=bool(scan.meta["eight_bit"])))
    return finalise_transforms(spec)({"image": pixels})["image"]
