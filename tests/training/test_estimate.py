"""``train --dry-run``: the cost of a run, measured on this machine, with nothing written."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.training.estimate import estimate_training
from tests.training.conftest import TINY_OVERRIDES

runner = CliRunner()


def test_estimate_measures_rates_and_sums_the_stages(tiny_data: Path) -> None:
    est = estimate_training(tiny_data, config="quickstart", overrides=TINY_OVERRIDES)
    assert est.counts == {"train": 20, "val": 10, "test": 10}
    assert est.size == (48, 48) and "as set explicitly" in est.size_reason
    assert est.decode_per_s > 0 and est.infer_per_s > 0 and est.train_per_s and est.train_per_s > 0
    names = [n for n, _ in est.stages]
    assert names[0].startswith("decode 40 scans") and any("full epoch" in n for n in names)
    full = next(s for n, s in est.stages if "full epoch" in n)
    # 2 unfrozen epochs (3 epochs, 1 head-only), each: 20 training images at the training rate + 10 validation
    assert abs(full - 2 * (20 / est.train_per_s + 10 / est.infer_per_s)) < 1e-6
    assert abs(est.total_s - sum(s for _, s in est.stages)) < 1e-9


def test_linear_probe_estimate_has_no_training_steps(tiny_data: Path) -> None:
    est = estimate_training(tiny_data, config="linear-probe", overrides=TINY_OVERRIDES)
    assert est.train_per_s is None and not any("full epoch" in n for n, _ in est.stages)
    assert any("frozen features of 30 images" in n for n, _ in est.stages)


def test_cli_dry_run_prints_the_cost_and_writes_nothing(tiny_data: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in tiny_data.parent.iterdir())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = runner.invoke(app, ["--quiet", "train", str(tiny_data), "--config", "quickstart", "--dry-run",
                                     *[a for o in TINY_OVERRIDES for a in ("--set", o)]])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "images: 20 train, 10 val, 10 test" in out and "input: input.size 48x48" in out
    assert "training" in out and "images/s" in out and "total (at most" in out and "dry run" in out
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no cache
    assert sorted(p.name for p in tiny_data.parent.iterdir()) == before
