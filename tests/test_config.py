"""Config errors name where the bad key came from: the ``--set`` override, or the YAML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.config import RunConfig, apply_overrides, load_config
from medtransfer.errors import ConfigError

runner = CliRunner()


def _bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 3\n  pateince: 3\n", encoding="utf-8")
    return path


def test_an_unknown_key_from_an_override_is_blamed_on_the_override_not_the_preset() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["train.epochs=4", "train.pateince=3"])
    msg = str(err.value)
    assert msg.startswith("--set train.pateince=3: unknown key 'train.pateince'"), msg
    assert "did you mean 'train.patience'?" in msg
    assert "quickstart" not in msg and "epochs=4" not in msg


def test_an_unknown_key_from_a_yaml_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_bad_yaml(tmp_path), ["train.patience=3"])
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'mine.yaml'}: unknown key 'train.pateince'"), msg
    assert "did you mean 'train.patience'?" in msg and "--set" not in msg


@pytest.mark.parametrize(("overrides", "source", "where"), [
    (["train.patience=0"], "--set train.patience=0", "train.patience"),
    (["input.size=[a, 3]"], "--set input.size=[a, 3]", "input.size.0"),
    (["eval.threshold=sensitivity"], "--set eval.threshold=sensitivity", "eval"),  # a section-level check
])
def test_a_bad_value_names_the_override_that_set_it(overrides: list[str], source: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["train.epochs=4", *overrides])
    assert str(err.value).startswith(f"{source}: '{where}'"), str(err.value)


def test_a_bad_value_in_a_file_names_the_file_and_a_later_override_wins(tmp_path: Path) -> None:
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}: 'train.lr'"):
        load_config(path)
    assert load_config(path, ["train.lr=0.01"]).train.lr == 0.01  # the file's value was replaced


def test_overrides_of_a_loaded_config_name_themselves() -> None:
    with pytest.raises(ConfigError, match=r"^--set train.lr=-1: 'train.lr'"):
        apply_overrides(RunConfig(), ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"^--set trian.lr=1: unknown key 'trian' — did you mean 'train'"):
        apply_overrides(RunConfig(), ["trian.lr=1"])


def test_cli_blames_the_set_option(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path), "--config", "quickstart", "--set", "train.pateince=3",
                                 "--out", str(tmp_path / "run")], env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "--set train.pateince=3: unknown key 'train.pateince' — did you mean 'train.patience'?" in text, text
    assert "quickstart.yaml" not in text and "Traceback" not in text


def test_cli_blames_the_yaml_file(tmp_path: Path) -> None:
    path = _bad_yaml(tmp_path)
    result = runner.invoke(app, ["train", str(tmp_path), "--config", str(path), "--set", "train.patience=3",
                                 "--out", str(tmp_path / "run")], env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"{path}: unknown key 'train.pateince' — did you mean 'train.patience'?" in text, text
