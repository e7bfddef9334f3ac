"""The frozen-feature cache: compute a frozen backbone's pooled features once per image, then train heads.

With the backbone frozen (BatchNorm in eval mode, no augmentation), every epoch of head training sees the
same features, so recomputing the backbone each epoch is wasted work: a linear probe becomes many epochs
in seconds. Features are stored as safetensors (never pickle) under
``<cache_dir>/features/<key>.safetensors``, where ``key`` hashes the backbone's weights, the InputSpec and
the cases (case_id + file size/mtime), so any change recomputes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medtransfer import distributed, io
from medtransfer.data.manifest import Manifest
from medtransfer.data.spec import InputSpec
from medtransfer.inference import forward_batches
from medtransfer.progress import progress_bar

logger = logging.getLogger(__name__)


def backbone_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the backbone's parameters and buffers (everything but the head)."""
    h = hashlib.sha256()
    head_ids = {id(p) for p in model.head.parameters()} if hasattr(model, "head") else set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in head_ids or name.startswith("head."):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(model: torch.nn.Module, manifest: Manifest, spec: InputSpec) -> str:
    """Key that changes when the backbone, the preprocessing or any case changes."""
    h = hashlib.sha256()
    h.update(backbone_digest(model).encode())
    h.update(spec.key().encode())
    for _, row in manifest.df.iterrows():
        h.update(str(row["case_id"]).encode())
        for path in manifest.abspath(row):
            try:
                st = path.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()[:32]


def compute_features(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    description: str = "features",
) -> torch.Tensor:
    """Pooled features (N, F) float32 of every batch in ``loader``, through the one inference path."""
    # counted in images, not batches: "120/480 images" in a log says how far a long frozen pass has got
    n_images = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[arg-type]
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=n_images if n_images is not None else len(loader),
                            unit="images" if n_images is not None else "batches", info="")

        def counted() -> Iterator[Any]:
            for batch in loader:
                yield batch
                bar.advance(task, len(batch["image"]) if n_images is not None else 1)

        feats, _ = forward_batches(model, counted(), device=device, amp=amp, channels_last=channels_last,
                                   output="features")
    return feats


def cached_features(
    model: torch.nn.Module,
    manifest: Manifest,
    loader_for: Callable[[Manifest], torch.utils.data.DataLoader],
    *,
    spec: InputSpec,
    cache_dir: str | Path | None,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    description: str = "features",
) -> torch.Tensor:
    """Features for ``manifest`` in its order, from the cache when present, else computed and stored.

    ``loader_for(m)`` must iterate the cases of ``m`` in order without shuffling and with eval transforms.
    Under torchrun each rank computes a contiguous block of the cases, the blocks are gathered on every rank,
    and rank 0 alone writes the cache file (rank 0 also decides whether the cache is there, so every rank
    takes the same path).
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "features" / f"{cache_key(model, manifest, spec)}.safetensors"
        if distributed.main_first(path.is_file):
            cached = None
            try:
                cached = load_file(str(path))["features"]
                if len(cached) != len(manifest):
                    cached = None
            except Exception as exc:  # corrupt cache file: recompute rather than fail the run
                logger.warning("ignoring unreadable feature cache %s (%s)", path.name, exc)
            # a file that some rank could not use is recomputed by every rank, so that all take the same path
            if all(distributed.gather_objects(cached is not None)):
                logger.info("feature cache hit: %s", path.name)
                return cached  # type: ignore[return-value]
    part = manifest.rows(*distributed.shard_bounds(len(manifest))) if distributed.active() else manifest
    if distributed.active():  # rank 0's bar counts its own block
        description = f"{description}, rank 0's share of {distributed.world_size()} processes"
    feats = compute_features(model, loader_for(part), device=device, amp=amp, channels_last=channels_last,
                             progress=progress and distributed.is_main(), description=description)
    feats = distributed.gather_rows(feats)
    if path is not None and distributed.is_main():
        with io.atomic_path(path) as tmp:
            save_file({"features": feats.contiguous()}, str(tmp))
    return feats
