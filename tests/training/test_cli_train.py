"""``medtransfer train`` option checks that happen before any work (typer's CliRunner, in-process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtransfer.cli import app

runner = CliRunner()


@pytest.mark.parametrize("extra, named", [(["--epochs", "3"], "train.epochs"),
                                          (["--set", "train.lr=0.1"], "train.lr"),
                                          (["--config", "chexnet"], "--config")])
def test_resume_refuses_options_it_would_ignore(tmp_path: Path, extra: list[str], named: str) -> None:
    result = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "run"), *extra],
                           env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())  # rich's error box, unwrapped
    assert result.exit_code == 2
    assert named in text and "config.yaml" in text, text
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_vit_refuses_an_input_size_its_position_embeddings_cannot_take(tmp_path: Path) -> None:
    from medtransfer.config import load_config
    from medtransfer.errors import ConfigError
    from medtransfer.training.run import resolve_input_spec

    with pytest.raises(ConfigError, match=r"224x224.*--image-size 224"):
        resolve_input_spec(load_config(None, ["model.backbone=vit_b_16", "input.size=[128, 128]"]))
    assert resolve_input_spec(load_config(None, ["model.backbone=vit_b_16", "input.size=[224, 224]"])).size == (224, 224)
