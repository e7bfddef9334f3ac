"""Safe checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Loading a pickle can run arbitrary code, so a medtransfer checkpoint is never one: a trained model is
``model.safetensors`` + ``model_card.json``; a resumable training state is ``training_state.json`` +
``training_state.<sha>.safetensors``. Every safetensors file is checked (header size, bounds, JSON) before
it is parsed. The one place a pickle is read is a user's pretrained *weights file* (``--weights-file``),
with ``torch.load(weights_only=True)``, which refuses any pickle that would call code
(:func:`medtransfer.models.backbones.read_weights_file`).

Training state layout (``save_training_state``): tensors (model state, optimizer state such as
``optim.state.<param_idx>.exp_avg``, torch/CUDA RNG states) go into ONE safetensors file named after its
sha256; the rest (param-group hyper-parameters, scheduler state, python/numpy RNG, epoch, extra) into
``training_state.json``, which records that file's name and sha256 and is written last. The JSON names
the pair, so a crash at any moment leaves either the previous complete pair or the new one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from medtransfer import io
from medtransfer.digest import sha256_file
from medtransfer.errors import CheckpointError
from medtransfer.models.card import ModelCard
from medtransfer.models.classifier import Classifier, build_model
from medtransfer.models.timm_backbones import version_warning
from medtransfer.models.weights_io import (
    CARD_FILE,
    MODEL_FILE,
    PICKLE_SUFFIXES,
    load_safetensors_file,
    load_state_dict_checked,
    refuse_pickle,
)

logger = logging.getLogger(__name__)

STATE_JSON = "training_state.json"
STATE_FORMAT = "medtransfer-training-state"
STATE_VERSION = 1
_STAGING = "training_state.staging.safetensors"
_TENSORS_NAME = re.compile(r"^training_state\.[0-9a-f]{16}\.safetensors$")
_TAGS = ("__tensor__", "__float__", "__tuple__", "__ndarray__", "__dict__")


# -- trained models -------------------------------------------------------------------------------------
def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` as safetensors, atomically."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with io.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return Path(path)


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Fill ``model`` from a safetensors file written by :func:`save_weights` (strict keys and shapes)."""
    load_state_dict_checked(model, load_safetensors_file(path), source=str(path))
    return model


def save_model(model: Classifier, run_dir: str | os.PathLike[str], card: ModelCard) -> Path:
    """Write ``model.safetensors`` and ``model_card.json`` into ``run_dir`` (weights first, card last).

    Raises:
        CheckpointError: the card does not describe this model (backbone, number of outputs, volume kind or
            slice context differ).
    """
    d = Path(run_dir)
    if card.backbone != model.spec.name or card.num_outputs != model.num_outputs:
        raise CheckpointError(f"model card says {card.backbone} with {card.num_outputs} outputs, but the model "
                              f"is {model.spec.name} with {model.num_outputs}; build the card from this model.")
    kind = (getattr(model, "volume", None), getattr(model, "slice_context", None))
    if (card.volume, card.slice_context) != kind:
        raise CheckpointError(f"model card says volume={card.volume}, slice_context={card.slice_context}, but the "
                              f"model is volume={kind[0]}, slice_context={kind[1]}; build the card "
                              "from this model (volume=model.volume, slice_context=model.slice_context).")
    save_weights(model, d / MODEL_FILE)
    card.save(d / CARD_FILE)
    return d


def load_model(run_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[Classifier, ModelCard]:
    """Rebuild a trained classifier from its run directory, without needing pretrained weights.

    Returns:
        (model in eval mode on ``device``, its card).

    Raises:
        CheckpointError: a pickle passed instead of a run directory, missing/corrupt files, an unknown
            backbone, or tensors whose names or shapes do not match the card's architecture.

    Examples:
        >>> model, card = load_model("runs/cxr1")  # doctest: +SKIP
    """
    d = Path(run_dir)
    if d.is_file():
        refuse_pickle(d)
        raise CheckpointError(f"{d}: expected a run directory holding {MODEL_FILE} and {CARD_FILE}, got a file.")
    card = ModelCard.load(d / CARD_FILE)
    weights = d / MODEL_FILE
    if not weights.is_file():
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in PICKLE_SUFFIXES:
                refuse_pickle(f)
        raise CheckpointError(f"{weights}: not found; the run did not finish saving. Re-run training.")
    if (warning := version_warning(card.weights, card.backbone)) is not None:
        logger.warning(warning)
    model = build_model(card.backbone, card.classes, task=card.task, in_channels=card.input.channels,
                        weights="none", volume=card.volume, slice_context=card.slice_context or 3)
    load_weights(model, weights)
    return model.eval().to(device), card


# -- training state ---------------------------------------------------------------------------------------
def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors move to ``tensors`` under dotted ``key`` and leave a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), key, tensors)
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, key, {}), _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    raise CheckpointError(f"cannot save a {type(obj).__name__} at '{key}' in the training state: only tensors, "
                          "numbers, strings, lists, tuples and dicts are stored (never pickles).")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"training state refers to tensor '{obj['__tensor__']}', absent from its file.")
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _capture_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "python": random.getstate(),
                           "numpy": np.random.get_state(legacy=False)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    # Function references (older OneCycleLR's anneal_func) are rebuilt by the fresh scheduler's __init__;
    # LambdaLR already stores plain functions as None and callable objects as their __dict__.
    return {k: v for k, v in scheduler.state_dict().items() if not callable(v)}


def save_training_state(
    path_dir: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    epoch: int,
    step: int,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save everything needed to resume training into ``path_dir`` (see the module docstring).

    Args:
        path_dir: a folder (e.g. ``runs/x/checkpoints/last``), created if needed.
        model, optimizer, scheduler: their state dicts are saved (optimizer/scheduler may be None).
        epoch, step: epochs and optimiser steps completed.
        rng: extra RNG states of your own (e.g. generator states); the global torch, CUDA, python and numpy
            RNG states are always saved.
        extra: anything else JSON-like (best metric, history); tensors inside are allowed.

    Returns:
        The path of ``training_state.json``.
    """
    d = Path(path_dir)
    tensors: dict[str, torch.Tensor] = {}
    doc: dict[str, Any] = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": int(epoch), "step": int(step),
        "model": _encode(model.state_dict(), "model", tensors),
        "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
        "optimizer": _encode(optimizer.state_dict(), "optim", tensors) if optimizer is not None else None,
        "scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
        "scheduler": _encode(_scheduler_state(scheduler), "sched", tensors) if scheduler is not None else None,
        "global_rng": _encode(_capture_rng(), "rng", tensors),
        "rng": _encode(rng or {}, "user_rng", tensors),
        "extra": _encode(extra or {}, "extra", tensors),
    }
    staging = d / _STAGING
    with io.atomic_path(staging) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    sha = sha256_file(staging, memoise=False)
    final = d / f"training_state.{sha[:16]}.safetensors"
    os.replace(staging, final)  # tensors first...
    doc.update(tensors_file=final.name, tensors_sha256=sha)
    io.write_json(d / STATE_JSON, doc)  # ...the JSON last: its presence means the pair is complete
    for old in d.glob("training_state.*.safetensors"):
        if old.name != final.name:
            old.unlink(missing_ok=True)
    return d / STATE_JSON


def training_state_exists(path_dir: str | os.PathLike[str]) -> bool:
    """Whether ``path_dir`` holds a complete training state (its JSON exists)."""
    return (Path(path_dir) / STATE_JSON).is_file()


def peek_training_state(path_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a training state without applying it.

    Returns:
        dict with ``epoch``, ``step``, ``model`` (state dict), ``optimizer``, ``scheduler`` (state dicts or
        None), ``optimizer_class``, ``scheduler_class``, ``global_rng``, ``rng`` and ``extra``.

    Raises:
        CheckpointError: missing or corrupt JSON, missing tensors file, sha256 mismatch, bad safetensors.
    """
    d = Path(path_dir)
    doc_path = d / STATE_JSON
    if not doc_path.is_file():
        raise CheckpointError(f"{doc_path}: no training state here (nothing to resume from).")
    try:
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{doc_path}: corrupt training state JSON ({exc}); delete {d} to start over.") from exc
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("version", 0) > STATE_VERSION:
        raise CheckpointError(f"{doc_path}: not a medtransfer training state (version {STATE_VERSION}).")
    name = str(doc.get("tensors_file", ""))
    if not _TENSORS_NAME.match(name) or not (d / name).is_file():
        raise CheckpointError(f"{doc_path}: its tensors file '{name}' is missing; the state is incomplete. "
                              f"Delete {d} to start over.")
    if sha256_file(d / name, memoise=False) != doc.get("tensors_sha256"):
        raise CheckpointError(f"{d / name}: sha256 does not match {STATE_JSON}; the file is corrupt or from "
                              f"another save. Delete {d} to start over.")
    tensors = load_safetensors_file(d / name)
    keys = ("epoch", "step", "model", "optimizer", "scheduler", "optimizer_class", "scheduler_class",
            "global_rng", "rng", "extra")
    return {k: _decode(doc.get(k), tensors) for k in keys}


def load_training_state(
    path_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a state written by :func:`save_training_state` into fresh objects.

    Args:
        path_dir: the folder passed to :func:`save_training_state`.
        model: same architecture; loaded strictly.
        optimizer, scheduler: same classes and parameter groups as when saved, or None to skip.
        restore_rng: also restore the global torch/CUDA/python/numpy RNG states.

    Returns:
        ``epoch``, ``step``, ``rng`` (your own RNG states), ``extra``, ``optimizer_class``, ``scheduler_class``.

    Raises:
        CheckpointError: see :func:`peek_training_state`; also a mismatched model, optimizer or scheduler.
    """
    state = peek_training_state(path_dir)
    load_state_dict_checked(model, state["model"], source=f"{path_dir} (training state)")
    for obj, kind in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        saved_class = state[f"{kind}_class"]
        if state[kind] is None or saved_class != type(obj).__name__:
            raise CheckpointError(f"{path_dir}: saved {kind} is {saved_class}, cannot restore a "
                                  f"{type(obj).__name__}; resume with the same training config.")
        try:
            obj.load_state_dict(state[kind])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path_dir}: the saved {kind} state does not fit ({exc}); resume with the "
                                  "same training config.") from exc
    if restore_rng:
        _restore_rng(state["global_rng"])
    return {k: state[k] for k in ("epoch", "step", "rng", "extra", "optimizer_class", "scheduler_class")}
