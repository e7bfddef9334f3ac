"""Item 8: same seed and data on the CPU give identical metrics and an identical ``model.safetensors``, across
two runs and across ``train.num_workers`` 0 and 2 (augmentation on: each case's augmentation is seeded from
(loader seed, case index), not from whichever worker loads it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.conftest import (
    N_BOOT,
    Pipeline,
    assert_ok,
    cli,
    evaluation_without_timing,
    history,
    sha256,
    train_args,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_gives_the_same_weights_and_metrics(pipeline: Pipeline, tmp_path: Path, num_workers: int) -> None:
    run = tmp_path / "run"  # named like the pipeline's run: evaluation.json records the run's name
    assert_ok(cli(*train_args(pipeline.data, run, f"train.num_workers={num_workers}")))
    assert_ok(cli("--quiet", "evaluate", run, "--n-boot", N_BOOT))

    assert sha256(run / "model.safetensors") == sha256(pipeline.run / "model.safetensors")
    assert history(run) == history(pipeline.run)
    assert evaluation_without_timing(run / "evaluation.json") == evaluation_without_timing(
        pipeline.run / "evaluation.json")
    assert (run / "predictions.csv").read_bytes() == (pipeline.run / "predictions.csv").read_bytes()
