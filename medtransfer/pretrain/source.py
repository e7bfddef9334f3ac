"""A pretraining folder as a weights source: ``train --weights RUN_PT`` (or ``model.weights: RUN_PT``).

A leaf module (json and paths only), so training, the model card and the audit can resolve a folder written
by ``medtransfer pretrain`` without importing the pretraining code. The folder's ``pretrain.json`` names the
backbone it was pretrained for and the sha256 of ``backbone.safetensors``; a folder for another backbone, an
unfinished one or one whose weights file changed is refused with the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtransfer.digest import sha256_file
from medtransfer.errors import CheckpointError, ConfigError

PRETRAIN_FILE = "pretrain.json"
WEIGHTS_FILE = "backbone.safetensors"


def is_pretrain_folder(weights: str) -> bool:
    """Whether ``weights`` names a folder (finished or not) rather than ``imagenet``/``none``/a file."""
    if weights in ("imagenet", "none"):
        return False
    return Path(weights).expanduser().is_dir()


def resolve_weights(weights: str, backbone: str) -> tuple[str, dict[str, Any] | None]:
    """``(weights argument for the backbone loader, pretraining info or None)``.

    ``imagenet``, ``none`` and weights files pass through unchanged. A pretraining folder becomes the path of its
    ``backbone.safetensors``, after checking it is finished, made for ``backbone`` and intact.

    Raises:
        ConfigError: a folder pretrained for another backbone, or a folder that is no pretraining.
        CheckpointError: an unfinished pretraining, or a weights file whose sha256 differs from the record.
    """
    if not is_pretrain_folder(weights):
        return weights, None
    folder = Path(weights).expanduser()
    record = folder / PRETRAIN_FILE
    if not record.is_file():
        if (folder / "checkpoints" / "last").is_dir():
            raise CheckpointError(f"{folder}: the pretraining has not finished (no {PRETRAIN_FILE}); resume it with "
                                  f"'medtransfer pretrain --resume --out {folder}'")
        raise ConfigError(f"{folder}: a folder given as weights must be written by 'medtransfer pretrain' (it has "
                          f"no {PRETRAIN_FILE}); for a weights file give the file itself")
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{record}: not readable JSON ({exc}); run the pretraining again") from exc
    if info.get("format") != "medtransfer-pretrain":
        raise ConfigError(f"{record}: not a medtransfer pretraining record")
    if info.get("backbone") != backbone:
        raise ConfigError(f"{folder} was pretrained for backbone {info.get('backbone')!r}, not {backbone!r}; "
                          f"pass --backbone {info.get('backbone')} (or pretrain {backbone})")
    path = folder / str(info.get("weights_file", WEIGHTS_FILE))
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the pretraining folder is incomplete. Run the pretraining again.")
    digest = sha256_file(path, memoise=False)
    if digest != info.get("sha256"):
        raise CheckpointError(f"{path}: sha256 {digest[:12]}… differs from {PRETRAIN_FILE} "
                              f"({str(info.get('sha256'))[:12]}…); the file was changed. Run the pretraining again.")
    summary = {k: info.get(k) for k in ("method", "images", "epochs", "initial_weights", "final_loss", "created")}
    summary.update({"folder": str(folder), "sha256": digest})
    return str(path), summary

