"""Reading tensors safely: safetensors with a validated header, pickles refused, strict state-dict loading.

A leaf module (it knows nothing of cards, classifiers or backbones), so both the backbone table (pretrained
weights) and the run checkpoints (trained weights) read tensors through the same checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from medtransfer.errors import CheckpointError

MODEL_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def refuse_pickle(path: str | os.PathLike[str]) -> None:
    """Refuse a pickle (``.pt/.pth/.ckpt/.bin`` or pickle/zip content) offered as a medtransfer checkpoint.

    Raises:
        CheckpointError: always when ``path`` looks like a pickle, explaining the safe format.
    """
    p = Path(path)
    magic = b""
    if p.is_file() and p.suffix.lower() != ".safetensors":  # safetensors' first bytes are a length: any value
        with open(p, "rb") as fh:
            magic = fh.read(2)
    if p.suffix.lower() in PICKLE_SUFFIXES or _is_pickle_magic(magic):
        raise CheckpointError(_pickle_message(p))


def _is_pickle_magic(head: bytes) -> bool:
    return head[:1] == b"\x80" or head[:2] == b"PK"  # pickle protocol 2+ / torch.save's zip container


def _pickle_message(p: Path) -> str:
    return (f"{p}: refused: this is a pickle file (torch.save). medtransfer checkpoints are safetensors + JSON "
            f"({MODEL_FILE} + {CARD_FILE} in a run directory), and pickles are never loaded because loading "
            "one can run arbitrary code. Pass the run directory instead; pretrained backbone weights go to "
            "--weights-file, which reads them with torch.load(weights_only=True).")


def _check_safetensors_header(p: Path) -> None:
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        # A pickle's first 8 bytes read as a huge header length, so it fails below; say what it probably is.
        hint = " It looks like a pickle (torch.save), which medtransfer never loads." if _is_pickle_magic(head) else ""
        if len(head) < 8:
            raise CheckpointError(f"{p}: not a safetensors file ({size} bytes, shorter than its 8-byte header).")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{p}: not a valid safetensors file: header length {n} exceeds the "
                                  f"{MAX_HEADER_BYTES}-byte limit.{hint}")
        if 8 + n > size:
            raise CheckpointError(f"{p}: corrupt safetensors file: header length {n} is larger than the file "
                                  f"({size} bytes); it is truncated or not safetensors.{hint}")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{p}: corrupt safetensors header (not JSON: {exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupt safetensors header (expected a JSON object).")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{p}: corrupt safetensors header: tensor '{name}' has data offsets "
                                  f"{offsets} outside the {data_len}-byte data section.")


def load_safetensors_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU after validating its header.

    Raises:
        CheckpointError: missing file, a pickle in disguise, oversized/out-of-bounds/non-JSON header, or
            any other parse error.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found.")
    _check_safetensors_header(p)
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # SafetensorError and friends: the file is corrupt
        raise CheckpointError(f"{p}: corrupt safetensors file ({exc}).") from exc


def load_state_dict_checked(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str, ignore_prefix: str | None = None
) -> None:
    """Load ``state`` into ``model``, refusing any missing, unexpected or wrongly shaped tensor.

    Args:
        model: the module to fill.
        state: name → tensor.
        source: what ``state`` came from, for messages.
        ignore_prefix: a submodule path (the original head) whose keys may be absent or differ; they are
            loaded only where names and shapes match.

    Raises:
        CheckpointError: naming a few missing/unexpected keys and every shape mismatch (up to 5).
    """
    own = model.state_dict()

    def ignored(k: str) -> bool:
        return ignore_prefix is not None and (k == ignore_prefix or k.startswith(ignore_prefix + "."))

    # the head's tensors load when they fit (an ImageNet head) and are dropped when they differ
    state = {k: v for k, v in state.items() if not ignored(k) or (k in own and v.shape == own[k].shape)}
    for k in own:  # files saved before BatchNorm counted batches lack these; they only matter if momentum=None
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state and not ignored(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:5])}")
        raise CheckpointError(f"{source}: tensors do not match the {type(model).__name__} architecture: "
                              f"{', '.join(parts)}. Use weights saved for this architecture and class count.")
    model.load_state_dict(state, strict=ignore_prefix is None)
