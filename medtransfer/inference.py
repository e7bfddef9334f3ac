"""The one inference path: a model run on scans, batched, without gradients, streaming and tolerant.

Every stage that runs a model on images without training it comes through here: validation during
training, frozen-feature extraction, calibration at the end of training, evaluation, prediction, the
shortcut and transfer audits, and the selection of cases to explain. :func:`forward_batches` is the only
place such a forward pass happens; :func:`run_model` feeds it the cases of a
:class:`~medtransfer.data.manifest.Manifest` through a DataLoader (decoded images stream through in
batches; nothing holds every image in memory), and an undecodable scan becomes a row with an ``error``
instead of stopping the others. :func:`predictions_table` turns the outputs into the table every later
stage reads (``predictions.csv``).

Predictions table columns, in order:

- ``case_id``, ``patient_key``, ``split``, ``path`` (relative to the data folder; like ``manifest.csv``,
  ``predictions.csv`` is the user's working file, so it may name files);
- ``label`` (single-label tasks: the true class name) and ``true_<class>`` (1/0, NaN when unknown; one-hot
  for single-label tasks) — only for labelled cases;
- ``p_<class>``: calibrated probability (temperature from the card; binary: the positive class only),
  ``p_raw_<class>``: the same before temperature scaling;
- ``pred_<class>``: 1/0 at the card's operating point (``card.thresholds``; 0.5 where the card has none);
  ``predicted``: binary → the class name at the threshold, multi-class → the arg-max class, multi-label →
  the ``;``-joined classes at or above their thresholds;
- for 2.5D volume models (``model.volume: slices``): ``peak_slice``, the input slice (0-based, inferior to
  superior) with the largest attention weight, and ``slice_attention``, every slice's attention weight
  (``;``-joined, summing to 1): which slices the prediction rests on;
- subgroup columns carried from the manifest (``sex``, ``age``, ``age_band``, ``site``, ``manufacturer``,
  ``view``, ``modality``), and ``error`` (empty, or why the case could not be decoded; such rows have no
  scores and are left out of metrics).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from medtransfer import device as dev
from medtransfer import distributed
from medtransfer.config import DataConfig
from medtransfer.data.dataset import ScanDataset, make_loader
from medtransfer.data.discovery import index_scans
from medtransfer.data.loading import sniff_format
from medtransfer.data.manifest import SUBGROUP_COLUMNS, Manifest
from medtransfer.data.privacy import pseudonym
from medtransfer.data.spec import InputSpec
from medtransfer.errors import ManifestError
from medtransfer.models.card import ModelCard
from medtransfer.models.outputs import decisions, probabilities, scored_classes
from medtransfer.predictions import normalise_predictions
from medtransfer.progress import progress_bar

logger = logging.getLogger(__name__)

Output = Literal["logits", "features"]


@dataclass
class Inference:
    """What one inference pass produced, in manifest order.

    Attributes:
        outputs: float32 (N, K) logits, or (N, F) pooled features with ``output="features"``; zeros for cases
            that could not be decoded.
        targets: targets as ``Manifest.targets()`` gives them (None for unlabelled cases).
        errors: row index → why that case could not be decoded.
        attention: float32 (N, S) attention weight of each input slice (2.5D volume models), else None.
    """

    outputs: np.ndarray
    targets: np.ndarray | None
    errors: dict[int, str] = field(default_factory=dict)
    attention: np.ndarray | None = None

    @property
    def ok(self) -> np.ndarray:
        """Boolean (N,) mask of the cases that were decoded and scored."""
        mask = np.ones(len(self.outputs), dtype=bool)
        mask[list(self.errors)] = False
        return mask


class TolerantDataset(torch.utils.data.Dataset):
    """A ScanDataset whose undecodable cases come back as a blank image plus an ``error`` reason.

    Items are dicts ``{"image", "label", "case_id", "index", "error"}``; ``label`` is a zero placeholder for
    unlabelled manifests (never used).
    """

    def __init__(self, ds: ScanDataset) -> None:
        self.ds = ds
        self.targets = ds.manifest.targets() if ds.manifest.has_labels else None
        self.dtype = torch.long if ds.manifest.task == "multiclass" else torch.float32

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        error = ""
        try:
            image = self.ds[i]["image"]
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes a row with an error, never a crash
            error = getattr(exc, "reason", None) or f"could not be decoded ({type(exc).__name__})"
            image = torch.zeros((self.ds.spec.channels, *self.ds.spec.size), dtype=torch.float32)
        target = np.array(self.targets[i]) if self.targets is not None else np.array(0)
        return {"image": image, "label": torch.as_tensor(target, dtype=self.dtype),
                "case_id": str(self.ds.manifest.df.iloc[i]["case_id"]), "index": i, "error": error}


def slice_attention(model: torch.nn.Module) -> torch.Tensor | None:
    """The per-slice attention weights (B, S) of a 2.5D volume model's last forward pass, or None.

    2.5D models (:mod:`medtransfer.models.volumes`) pool their slices with attention-MIL and keep the weights
    of the last batch; every other model has none.
    """
    fn = getattr(model, "slice_attention", None)
    if callable(fn):
        return fn()
    return getattr(getattr(model, "head", None), "last_attention", None)


@torch.no_grad()
def forward_batches(model: torch.nn.Module, batches: Iterable[Any], *, device: torch.device,
                    amp: torch.dtype | None = None, channels_last: bool = False,
                    output: Output = "logits", attention: list[torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (eval mode, no grad) over batches of images: the one forward pass for inference.

    Args:
        model: a classifier (``output="features"`` needs its ``features`` method: the pooled backbone output).
        batches: dicts with ``image`` (and ``label``), or ``(image, label)`` pairs; images float (B, C, *size)
            normalised with the card's InputSpec.
        device, amp: where to run and the autocast dtype (None: full precision).
        channels_last: convert 4D image batches on CUDA.
        output: ``logits`` (N, K) or ``features`` (what ``model.head`` takes: (N, F), or (N, S, F) per slice).
        attention: when given (a list) and the model pools slices with attention, each batch's weights (B, S)
            are appended to it.

    Returns:
        ``(outputs, targets)`` on the CPU: float32 (N, K|F) and the batches' labels concatenated.
    """
    model.eval()
    forward = model.features if output == "features" else model
    outs, targets = [], []
    for batch in batches:
        x, y = (batch["image"], batch.get("label")) if isinstance(batch, dict) else batch
        x = dev.to_device(x, device, channels_last=channels_last)
        with dev.autocast(device, amp):
            out = forward(x)
        outs.append(out.float().cpu())
        weights = slice_attention(model) if attention is not None and output == "logits" else None
        if weights is not None:
            attention.append(weights.detach().float().cpu())
        if y is not None:
            targets.append(torch.as_tensor(y).cpu())
    return (torch.cat(outs) if outs else torch.empty(0),
            torch.cat(targets) if targets else torch.empty(0))


def run_model(model: torch.nn.Module, manifest: Manifest, spec: InputSpec, *, output: Output = "logits",
              batch_size: int = 32, device: str | torch.device = "auto", amp: bool = True, cpu_bf16: bool = False,
              num_workers: int = 0, cache_dir: str | Path | None = None, progress: bool = False,
              description: str = "predicting", shard: bool = True) -> Inference:
    """One batched no-grad pass (AMP and channels_last on CUDA) over every case of ``manifest``.

    Under torchrun (an initialised process group) each rank runs a contiguous block of whole batches
    (:func:`medtransfer.distributed.shard_bounds` over batches: no case twice, no padding) and the blocks are
    gathered in order, so every rank returns the result one process would (every rank must call it).

    Args:
        model: the classifier (returned to the device it came from afterwards).
        manifest: the cases (labelled or not).
        spec: the model card's InputSpec (never the config's: the card is what the model was trained with).
        output: ``logits`` or pooled ``features``.
        batch_size: inference batch size.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a torch.device).
        amp: autocast on CUDA (bfloat16 where supported).
        cpu_bf16: bfloat16 autocast on a CPU with native bfloat16 (``train.cpu_bf16``; see :mod:`medtransfer.device`).
        num_workers: data-loader worker processes for decoding.
        cache_dir: decoded-image cache (see :class:`ScanDataset`); None decodes without caching.
        progress: show progress (a bar on a terminal, periodic lines otherwise).
        description: the progress label.
        shard: split the cases across ranks under torchrun (False: this rank runs them all).

    Returns:
        An :class:`Inference` with outputs in manifest order; undecodable cases are listed in ``errors``.
    """
    if shard and distributed.active():
        # whole batches per rank: every batch holds the cases it would hold in one process, so the outputs
        # are those of one process (batch composition can change float32 results in the last bits)
        n_batches = -(-len(manifest) // max(1, batch_size))
        first, last = distributed.shard_bounds(n_batches)
        start, stop = min(first * batch_size, len(manifest)), min(last * batch_size, len(manifest))
        part = run_model(model, manifest.rows(start, stop), spec, output=output, batch_size=batch_size,
                         device=device, amp=amp, cpu_bf16=cpu_bf16, num_workers=num_workers, cache_dir=cache_dir,
                         progress=progress and distributed.is_main(), shard=False,
                         description=f"{description} (rank 0's share of {distributed.world_size()} processes)")
        return _gathered(part, start, manifest)
    target = device if isinstance(device, torch.device) else dev.resolve_device(device)
    amp_type = dev.amp_dtype(target, amp, cpu_bf16=cpu_bf16)
    home = next(model.parameters()).device
    net = dev.prepare_model(model, target, channels_last=True)
    data = TolerantDataset(ScanDataset(manifest, spec, train=False, cache_dir=cache_dir))
    loader = make_loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                         pin_memory=target.type == "cuda")
    errors: dict[int, str] = {}
    weights: list[torch.Tensor] = []
    try:
        outs, _ = forward_batches(net, _tap(loader, errors, progress, description), device=target, amp=amp_type,
                                  channels_last=True, output=output, attention=weights)
    finally:
        model.to(home)
    if errors:
        logger.warning("%d of %d case(s) could not be decoded; they get an 'error' and no scores",
                       len(errors), len(manifest))
    if output == "logits":
        arr = outs.numpy().reshape(len(manifest), -1) if len(manifest) else np.zeros((0, 1), np.float32)
    else:  # features keep their shape: (N, F), or (N, S, F) per slice
        arr = outs.numpy() if len(manifest) else np.zeros((0, 1), np.float32)
    att = torch.cat(weights).numpy() if weights and len(manifest) else None
    return Inference(arr, data.targets, errors, att if att is not None and len(att) == len(manifest) else None)


def _gathered(part: Inference, start: int, manifest: Manifest) -> Inference:
    """Every rank's block of an :class:`Inference`, in manifest order, on every rank."""
    # a rank with no cases (fewer cases than ranks) has an empty (0, 1) block: give it the others' row shape
    shapes = distributed.gather_objects(tuple(part.outputs.shape) if len(part.outputs) else None)
    row = next((sh[1:] for sh in shapes if sh is not None), (1,))
    mine = part.outputs if len(part.outputs) else np.zeros((0, *row), np.float32)
    outputs = distributed.gather_rows(torch.from_numpy(np.ascontiguousarray(mine))).numpy()
    errors: dict[int, str] = {}
    blocks = distributed.gather_objects(({start + i: reason for i, reason in part.errors.items()},
                                         part.attention if len(part.outputs) else "empty"))
    for block, _ in blocks:
        errors.update(block)
    att = [a for _, a in blocks if not isinstance(a, str)]
    attention = np.concatenate(att) if att and all(a is not None for a in att) else None
    targets = manifest.targets() if manifest.has_labels else None
    return Inference(outputs, targets, errors, attention if attention is not None and len(attention) == len(manifest)
                     else None)


def _tap(loader: Iterable[dict[str, Any]], errors: dict[int, str], progress: bool,
         description: str) -> Iterator[dict[str, Any]]:
    """Pass batches through, recording decode errors and advancing the progress display."""
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(loader), unit="batches", info="")  # type: ignore[arg-type]
        for batch in loader:
            for i, reason in zip(batch["index"].tolist(), batch["error"], strict=True):
                if reason:
                    errors[int(i)] = reason
            bar.advance(task)
            yield batch


def predictions_table(manifest: Manifest, card: ModelCard, result: Inference) -> pd.DataFrame:
    """The predictions table (module docstring) for ``manifest`` from an inference pass."""
    df = manifest.df
    out = pd.DataFrame({"case_id": df["case_id"].astype(str), "patient_key": df["patient_key"].astype(str),
                        "split": df["split"].astype(str) if "split" in df else "", "path": df["path"].astype(str)})
    if manifest.has_labels:
        out = pd.concat([out, _truth(manifest)], axis=1)
    out = pd.concat([out, _scores(card, result, df.index)], axis=1)
    if result.attention is not None:
        out = pd.concat([out, _attention(result, df.index)], axis=1)
    for col in SUBGROUP_COLUMNS:
        if col in df:
            out[col] = df[col].to_numpy()
    out["error"] = [result.errors.get(i, "") for i in range(len(df))]
    return normalise_predictions(out)


def _truth(manifest: Manifest) -> pd.DataFrame:
    df = manifest.df
    out = pd.DataFrame(index=df.index)
    if manifest.task == "multilabel":
        for c in manifest.classes:
            out[f"true_{c}"] = pd.to_numeric(df[c], errors="coerce").astype(float)
        return out
    label = df["label"].astype("string")
    out["label"] = label.astype(object).where(label.notna(), np.nan)
    for c in manifest.classes:
        out[f"true_{c}"] = np.where(label.isna(), np.nan, (label == c).astype(float))
    return out


def _scores(card: ModelCard, result: Inference, index: pd.Index) -> pd.DataFrame:
    classes = scored_classes(card)
    ok = result.ok
    cal = probabilities(result.outputs, card)
    raw = probabilities(result.outputs, card, calibrated=False)
    cal[~ok], raw[~ok] = np.nan, np.nan
    flags, predicted = decisions(cal, card)
    cols: dict[str, Any] = {f"p_{c}": cal[:, j] for j, c in enumerate(classes)}
    cols.update({f"p_raw_{c}": raw[:, j] for j, c in enumerate(classes)})
    for j, c in enumerate(classes):
        col = pd.array(flags[:, j], dtype="Int64")
        col[~ok] = pd.NA
        cols[f"pred_{c}"] = col
    cols["predicted"] = predicted
    return pd.DataFrame(cols, index=index)


def _attention(result: Inference, index: pd.Index) -> pd.DataFrame:
    """``peak_slice`` and ``slice_attention`` (``;``-joined weights, 4 decimals) per case; blank for errors."""
    att = np.asarray(result.attention, dtype=np.float64)
    ok = result.ok
    peak = pd.array(att.argmax(axis=1), dtype="Int64")
    peak[~ok] = pd.NA
    text = [";".join(f"{w:.4f}" for w in row) if good else np.nan for row, good in zip(att, ok, strict=True)]
    return pd.DataFrame({"peak_slice": peak, "slice_attention": text}, index=index)


def score_cases(model: torch.nn.Module, card: ModelCard, manifest: Manifest, *, batch_size: int = 32,
                device: str | torch.device = "auto", amp: bool = True, cpu_bf16: bool = False, num_workers: int = 0,
                cache_dir: str | Path | None = None, progress: bool = False) -> pd.DataFrame:
    """The predictions table (module docstring) of every case of ``manifest``, with the card's preprocessing,
    temperature and operating points; cases that cannot be decoded get an ``error`` and no scores."""
    result = run_model(model, manifest, card.input, batch_size=batch_size, device=device, amp=amp,
                       cpu_bf16=cpu_bf16, num_workers=num_workers, cache_dir=cache_dir, progress=progress)
    return predictions_table(manifest, card, result)


def score_files(model: torch.nn.Module, card: ModelCard, paths: Sequence[str | os.PathLike[str]], *,
                batch_size: int = 32, device: str | torch.device = "auto", amp: bool = True, cpu_bf16: bool = False,
                num_workers: int = 0, progress: bool = False) -> pd.DataFrame:
    """Score new scans without labels: files, and folders indexed as training data is.

    A folder goes through :func:`~medtransfer.data.discovery.index_scans` (DICOM by content, the slices of
    one series form one case, unreadable files quarantined with the reason); a file named directly is one
    case. Whatever cannot be scored becomes a row with an ``error``; it never stops the others.

    Args:
        model, card: the trained classifier and its card.
        paths: scan files and/or folders.
        batch_size, device, amp, cpu_bf16, num_workers, progress: as for :func:`run_model`.

    Returns:
        One row per case: ``case_id`` (pseudonymous), ``file`` (as passed, or the folder as passed joined with
        the case's path inside it), ``p_<class>`` (calibrated), ``pred_<class>`` (1/0 at the card's operating
        point), ``predicted`` and ``error``.

    Raises:
        ManifestError: a path does not exist, or nothing at all was found.
    """
    classes = scored_classes(card)
    keep = ["case_id", "file", *[f"p_{c}" for c in classes], *[f"pred_{c}" for c in classes], "predicted",
            "peak_slice", "slice_attention", "error"]
    tables = []
    files = [Path(p).expanduser() for p in paths if Path(p).expanduser().is_file()]
    for given in paths:
        p = Path(given).expanduser()
        if not p.exists():
            raise ManifestError(f"{given}: not found. Pass existing scan files or folders.")
        if p.is_dir():
            tables.append(_score_folder(model, card, given, amp=amp, cpu_bf16=cpu_bf16, batch_size=batch_size,
                                        device=device, num_workers=num_workers, progress=progress))
    if files:
        shown = [str(g) for g in paths if Path(g).expanduser().is_file()]
        tables.append(_score_named_files(model, card, shown, files, amp=amp, cpu_bf16=cpu_bf16, batch_size=batch_size,
                                         device=device, num_workers=num_workers, progress=progress))
    table = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) else None
    if table is None:
        raise ManifestError(f"no scans found in {', '.join(str(p) for p in paths)}; pass scan files or folders "
                            "that hold them (DICOM, NIfTI, PNG, JPEG).")
    return table.reindex(columns=[c for c in keep if c in table.columns or c not in ("peak_slice", "slice_attention")])


def _unlabelled(df: pd.DataFrame, card: ModelCard, data_dir: Path) -> Manifest:
    """The cases of ``df`` as a Manifest with the card's classes and no labels (nothing is learned from them)."""
    df = df.drop(columns=[c for c in ("label", *card.classes) if c in df.columns]).assign(split="new")
    for c in card.classes if card.task == "multilabel" else ["label"]:
        df[c] = np.nan
    return Manifest(df.reset_index(drop=True), list(card.classes), card.task, data_dir)


def _score_folder(model: torch.nn.Module, card: ModelCard, given: str | os.PathLike[str], **kw: Any) -> pd.DataFrame:
    indexed = index_scans(given, config=DataConfig(val_fraction=0, test_fraction=0, verify_pixels=False),
                          spatial_dims=card.input.spatial_dims, require_labels=False, progress=kw["progress"])
    out = []
    if len(indexed):
        manifest = _unlabelled(indexed.df, card, indexed.data_dir)
        table = score_cases(model, card, manifest, **kw)
        table["file"] = [(Path(str(given)) / rel).as_posix() for rel in manifest.df["path"]]
        out.append(table)
    q = indexed.quarantine
    if len(q):
        out.append(pd.DataFrame({"case_id": ["c" + pseudonym(str(r), kind="case", length=10) for r in q["path"]],
                                 "file": [(Path(str(given)) / str(r)).as_posix() for r in q["path"]],
                                 "predicted": "", "error": [f"{a}: {b}" for a, b in zip(q["problem"], q["reason"],
                                                                                       strict=True)]}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def _score_named_files(model: torch.nn.Module, card: ModelCard, shown: list[str], files: list[Path],
                       **kw: Any) -> pd.DataFrame:
    """Each named file is one case; the files are stored relative to the filesystem root (their anchor),
    because manifests refuse absolute paths (a manifest naming ``/etc/passwd`` was edited by someone)."""
    found = [(s, f.resolve(), sniff_format(f)) for s, f in zip(shown, files, strict=True)]
    case = {s: "c" + pseudonym(s, kind="case", length=10) for s, _, _ in found}
    good = [(s, f, fmt) for s, f, fmt in found if fmt is not None]
    out = []
    if good:
        anchor = Path(good[0][1].anchor)
        df = pd.DataFrame([{"case_id": case[s], "patient_key": case[s], "path": f.relative_to(f.anchor).as_posix(),
                            "files": "", "format": fmt} for s, f, fmt in good])
        table = score_cases(model, card, _unlabelled(df, card, anchor), **kw)
        table["file"] = [s for s, _, _ in good]
        out.append(table)
    bad = [s for s, _, fmt in found if fmt is None]
    if bad:
        out.append(pd.DataFrame({"case_id": [case[s] for s in bad], "file": bad, "predicted": "",
                                 "error": "not a recognised scan (DICOM, NIfTI, PNG or JPEG)"}))
    return pd.concat(out, ignore_index=True)
