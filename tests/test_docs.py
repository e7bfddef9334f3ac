"""The configuration reference (docs/configuration.md) is generated from the models and must not go stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from medtransfer.config import RunConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model`` (sections and leaves), walked independently of the generator."""
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _keys(sub, f"{prefix}{name}.")
    return out


def test_configuration_reference_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    assert _generator().main(["--out", str(out)]) == 0
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed, (
        "docs/configuration.md is stale: run 'python docs/gen_config_reference.py' and commit the result")


def test_configuration_reference_lists_every_key() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    keys = _keys(RunConfig)
    assert "train.augment.flip_prob" in keys and "input.size" in keys
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def test_attributes_section_parsing() -> None:
    gen = _generator()

    class Example:
        """Summary.

        Attributes:
            a, b: shared text
                continued.
            c: own text.

        Examples:
            x: not an attribute.
        """

    assert gen.attribute_docs(Example) == {"a": "shared text continued.", "b": "shared text continued.",
                                           "c": "own text."}
