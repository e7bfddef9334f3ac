"""Item 7: hostile model files are refused with a clear error, and nothing in them is executed.

The payload is a pickle whose unpickling writes a sentinel file (``__reduce__`` -> ``exec``); a control test
shows it really does. It is offered as a ``.pt`` checkpoint, as ``model.safetensors`` in a run directory, as a
``--weights-file``, as a training-state tensors file (with its sha256 updated to match) and as an image-cache
entry. Corrupt or oversized safetensors headers and model cards with an unknown backbone or mismatched shapes
are refused too. (The in-process checks of tests/models/test_checkpoint.py cover the same readers piecemeal.)
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from medtransfer.errors import CheckpointError, MedtransferError
from tests.reliability.conftest import Pipeline, assert_user_error, cli, copy_run, train_args


class _Payload:
    """Unpickling this writes ``target``: what an attacker's pickle would do (with worse code)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


@pytest.fixture()
def sentinel(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile file was executed"


def evil_pickle(path: Path, target: Path) -> Path:
    path.write_bytes(pickle.dumps({"_conv_stem.weight": _Payload(target)}, protocol=2))
    return path


def evil_torch_file(path: Path, target: Path) -> Path:
    import torch

    torch.save({"_conv_stem.weight": _Payload(target)}, path)  # torch.save's zip container holding the pickle
    return path


@pytest.fixture()
def run(pipeline: Pipeline, tmp_path: Path) -> Path:
    return copy_run(pipeline.run, tmp_path / "copy", drop=("cache", "saliency", "report.*", "best"))


def test_the_payload_really_executes_when_unpickled(tmp_path: Path) -> None:
    """Control: without the refusals below, loading these files would run code."""
    target = tmp_path / "control"
    pickle.loads(evil_pickle(tmp_path / "evil.pkl", target).read_bytes())  # noqa: S301 - the point of the test
    assert target.read_text() == "pwned"


@pytest.mark.parametrize("make", [evil_pickle, evil_torch_file])
def test_a_pickle_checkpoint_is_refused(tmp_path: Path, sentinel: Path, make) -> None:  # noqa: ANN001
    from medtransfer.models.backbones import read_weights_file
    from medtransfer.models.checkpoint import load_model
    from medtransfer.run_dir import load_run

    evil = make(tmp_path / "model.pt", sentinel)
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        load_model(evil)
    with pytest.raises(CheckpointError, match="refused"):  # --weights-file: torch.load(weights_only=True)
        read_weights_file(evil)
    with pytest.raises(MedtransferError):
        load_run(evil)


def test_a_pickle_named_model_safetensors_in_a_run_directory_is_refused(run: Path, sentinel: Path) -> None:
    from medtransfer.run_dir import load_run

    evil_pickle(run / "model.safetensors", sentinel)
    with pytest.raises(CheckpointError, match="pickle"):
        load_run(run)
    line = assert_user_error(cli("--quiet", "evaluate", run, "--n-boot", "0"), "CheckpointError", "pickle")
    assert "model.safetensors" in line


def test_a_run_directory_holding_only_a_pickle_is_refused(run: Path, sentinel: Path) -> None:
    from medtransfer.run_dir import load_run

    (run / "model.safetensors").unlink()
    evil_torch_file(run / "model.pt", sentinel)
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        load_run(run)


def test_a_pickle_weights_file_for_training_is_refused(pipeline: Pipeline, tmp_path: Path, sentinel: Path) -> None:
    evil = evil_torch_file(tmp_path / "weights.pth", sentinel)
    proc = cli(*train_args(pipeline.data, tmp_path / "run"), "--weights-file", evil)
    assert_user_error(proc, "CheckpointError", "refused", "weights_only=True")


def _safetensors(header: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


CORRUPT = {
    "empty": b"",
    "shorter than its header length": _safetensors(b"{}")[:5],
    "header length beyond the file": _safetensors(b'{"a": 1}', length=10_000),
    "oversized header length": _safetensors(b"{}", length=(100 << 20) + 1),
    "header length 2**63": _safetensors(b"{}", length=1 << 63),
    "header not JSON": _safetensors(b"\xff\xfe not json"),
    "header not an object": _safetensors(b"[1, 2]"),
    "offsets outside the data": _safetensors(
        json.dumps({"_conv_stem.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1 << 40]}}).encode()),
    "negative offsets": _safetensors(
        json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}).encode(), b"\0" * 4),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_or_oversized_safetensors_file_is_refused(run: Path, kind: str) -> None:
    from medtransfer.run_dir import load_run

    (run / "model.safetensors").write_bytes(CORRUPT[kind])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_run(run)


def test_a_truncated_model_file_is_refused(run: Path) -> None:
    from medtransfer.run_dir import load_run

    path = run / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_run(run)


def _edit_card(run: Path, **changes: object) -> None:
    card = json.loads((run / "model_card.json").read_text())
    card.update(changes)
    (run / "model_card.json").write_text(json.dumps(card))


def test_a_model_card_with_an_unknown_backbone_is_refused(run: Path) -> None:
    from medtransfer.run_dir import load_run

    _edit_card(run, backbone="resnet9000")
    with pytest.raises(CheckpointError, match="unknown backbone 'resnet9000'"):
        load_run(run)
    assert_user_error(cli("--quiet", "evaluate", run, "--n-boot", "0"), "model_card.json", "resnet9000")


def test_a_model_card_that_does_not_match_the_weights_is_refused(run: Path) -> None:
    from medtransfer.run_dir import load_run

    _edit_card(run, task="multiclass", classes=["a", "b", "c"], num_outputs=3, thresholds={})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_run(run)
    _edit_card(run, task="binary", classes=["normal", "pneumonia"], num_outputs=1, backbone="resnet18")
    with pytest.raises(CheckpointError, match="do not match"):
        load_run(run)


def test_a_model_card_with_unknown_fields_is_refused(run: Path) -> None:
    from medtransfer.run_dir import load_run

    _edit_card(run, __reduce__="os.system")
    with pytest.raises(CheckpointError, match="invalid model card"):
        load_run(run)


def test_a_pickle_as_training_state_tensors_is_refused_even_with_a_matching_sha(run: Path, sentinel: Path) -> None:
    """An attacker who can write the run directory can update the sha256 in training_state.json too."""
    from medtransfer.models.checkpoint import peek_training_state

    last = run / "checkpoints" / "last"
    doc = json.loads((last / "training_state.json").read_text())
    tensors = last / doc["tensors_file"]
    evil_pickle(tensors, sentinel)
    doc["tensors_sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()
    (last / "training_state.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="pickle"):
        peek_training_state(last)
    assert_user_error(cli("--quiet", "train", "--resume", "--out", run), "CheckpointError", "pickle")


def test_a_pickled_image_cache_entry_is_never_unpickled(pipeline: Pipeline, tmp_path: Path, sentinel: Path) -> None:
    """The image cache holds .npy arrays read with allow_pickle=False; a pickled entry is ignored and redone."""
    from medtransfer.data.dataset import ScanDataset
    from medtransfer.run_dir import load_run

    run = copy_run(pipeline.run, tmp_path / "copy", drop=("saliency", "report.*", "checkpoints"))
    entries = list((run / "cache").rglob("*.npy"))
    assert entries
    hostile = np.empty(1, dtype=object)
    hostile[0] = _Payload(sentinel)
    for entry in entries:
        with open(entry, "wb") as fh:
            np.save(fh, hostile, allow_pickle=True)
    loaded = load_run(run)
    ds = ScanDataset(loaded.manifest, loaded.card.input, cache_dir=run / "cache")
    images = [ds.cached_image(i) for i in range(len(ds))]
    assert all(im.dtype == np.float32 and np.isfinite(im).all() for im in images)
    assert ds.decode_count == len(ds)  # every entry was refused and decoded again
