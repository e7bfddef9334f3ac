"""Training and inference under torchrun (DDP) with 2 CPU processes and gloo, against one process.

Real code paths end to end: ``medtransfer train --nproc 2`` (torchrun's elastic agent through its Python API),
``python -m torch.distributed.run ... -m medtransfer evaluate/explain`` (torchrun itself), a rank SIGKILLed
mid-epoch under ``--max-restarts 1``. ``MEDTRANSFER_DDP_BACKEND=nccl`` runs the same tests with NCCL on a
machine with two or more GPUs (benchmarks/gpu.sh does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtransfer import faults
from tests.training.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow

OVERRIDES = [*TINY_OVERRIDES, "train.strategy=fine-tune", "train.patience=5"]


def _env(**extra: str) -> dict[str, str]:
    # one thread per process in every run, so that one process and two compute with the same kernels
    env = {**os.environ, "MEDTRANSFER_SALT": "test-salt-not-secret", "OMP_NUM_THREADS": "1", **extra}
    if not torch_cuda_for_ddp():
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def torch_cuda_for_ddp() -> bool:
    """NCCL was asked for (a GPU machine); otherwise the tests run on the CPU with gloo."""
    return os.environ.get("MEDTRANSFER_DDP_BACKEND") == "nccl"


def _train(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "medtransfer", "train", str(data), "--out", str(out), *extra]
    for item in OVERRIDES:
        cmd += ["--set", item]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=600)


def _torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "medtransfer", *args]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=600)


def _files(run: Path) -> set[str]:
    """The run's files (content-hashed names with the hash blanked), without caches and the lock."""
    return {re.sub(r"\.[0-9a-f]{16}\.", ".<hash>.", str(p.relative_to(run))) for p in run.rglob("*")
            if p.is_file() and "cache" not in p.parts and p.name != ".lock"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, Path]:
    """One run trained in one process, the same run in two (rank 1 killed if it writes any run file)."""
    root = tmp_path_factory.mktemp("ddp")
    single = _train(tiny_data, root / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    # rank 1 is SIGKILLed at the first file it writes through medtransfer.io except image-cache entries
    # (*.npy, its own share of the decoded-image cache): so the run succeeds only if rank 1 writes nothing else
    guard = faults.subprocess_env("write", match="*[!y]", rank=1)
    double = _train(tiny_data, root / "two", "--nproc", "2", env=_env(**guard))
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-3000:]
    return root / "one", root / "two"


def test_two_processes_write_one_run_like_one_process(runs: tuple[Path, Path]) -> None:
    one, two = runs
    assert _files(one) == _files(two)  # the same run directory, written once (rank 1 wrote nothing)
    h1, h2 = pd.read_csv(one / "history.csv"), pd.read_csv(two / "history.csv")
    assert len(h1) == len(h2) == 3  # the same epochs
    assert list(h2["attempt"]) == [0, 0, 0]
    assert abs(h1["val_auroc"].iloc[-1] - h2["val_auroc"].iloc[-1]) <= 0.02
    # rank 0 indexed and split once: the same manifest as one process
    pd.testing.assert_frame_equal(pd.read_csv(one / "manifest.csv"), pd.read_csv(two / "manifest.csv"))
    card = json.loads((two / "model_card.json").read_text())
    assert card["training"]["epochs_run"] == 3
    # the global batch: 8 split over 2 processes -> 4 each; 15 training cases... every case seen per epoch
    cache = [p for p in (two / "cache").rglob("*.npy")]
    assert len(cache) == len(pd.read_csv(two / "manifest.csv").query("split != 'test'"))  # one entry per case


def test_sharded_evaluation_and_explain_equal_one_process(runs: tuple[Path, Path], tmp_path: Path) -> None:
    one, _ = runs
    solo = subprocess.run([sys.executable, "-m", "medtransfer", "evaluate", str(one), "--batch-size", "3",
                           "--out", str(tmp_path / "solo")], env=_env(), capture_output=True, text=True)
    assert solo.returncode == 0, solo.stderr[-3000:]
    shared = _torchrun("evaluate", str(one), "--batch-size", "3", "--out", str(tmp_path / "shared"))
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert shared.stdout.count("wrote ") == 1  # rank 0 alone reports
    p1 = pd.read_csv(tmp_path / "solo" / "predictions.csv")
    p2 = pd.read_csv(tmp_path / "shared" / "predictions.csv")
    pd.testing.assert_frame_equal(p1, p2, check_exact=False, atol=1e-9, rtol=0)
    e1 = json.loads((tmp_path / "solo" / "evaluation.json").read_text())
    e2 = json.loads((tmp_path / "shared" / "evaluation.json").read_text())
    for key in e1:
        if key != "meta":
            assert e1[key] == e2[key], key
    # explain: cases shared out, each rank writes its own maps, rank 0 the index
    ex = _torchrun("explain", str(one), "--cases", "2")
    assert ex.returncode == 0, ex.stderr[-3000:]
    index = pd.read_csv(one / "saliency" / "index.csv")
    assert len(index) >= 2 and index["case_id"].is_unique or len(index) == len(index.drop_duplicates())
    for rel in index["file"]:
        assert (one / "saliency" / rel).is_file(), rel
    scores = index["score"].to_numpy(dtype=float)
    assert np.isfinite(scores).all()


def test_a_rank_killed_mid_epoch_restarts_the_group_which_resumes(tiny_data: Path, tmp_path: Path) -> None:
    # 20 training cases, global batch 8 = 4 per process: 3 steps per epoch on each rank; step 5 is in epoch 2
    kill = faults.subprocess_env("step", nth=5, rank=1)
    out = tmp_path / "run"
    proc = _train(tiny_data, out, "--nproc", "2", "--max-restarts", "1", env=_env(**kill))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]  # every epoch once: resumed, not started over
    assert list(history["attempt"]) == [0, 1, 1]  # epoch 1 before the kill, 2 and 3 after the restart
    assert (out / "model.safetensors").is_file()
    assert not list(out.rglob(".tmp-*"))
