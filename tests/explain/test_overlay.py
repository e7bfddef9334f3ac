"""Overlay PNGs: written atomically, readable, no PHI or paths in the PNG text chunks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medtransfer.explain.overlay import save_overlay
from tests.factories import CANARIES


def test_overlay_png_has_only_minimal_metadata(tmp_path) -> None:
    out = tmp_path / "CANARYPID9137-folder" / "case1_pneumonia.png"  # a canary in the path must not leak
    yy, xx = np.mgrid[0:48, 0:48] / 48
    sal = np.exp(-((xx - 0.3) ** 2 + (yy - 0.4) ** 2) / 0.01)
    path = save_overlay(out, np.random.default_rng(0).random((1, 48, 48)), sal, title="c0ffee · pneumonia · p=0.9")
    assert path == out and out.is_file()
    assert not list(out.parent.glob(".tmp-*"))
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100
        chunks = {**im.info, **getattr(im, "text", {})}
    assert {k: v for k, v in chunks.items() if isinstance(v, str)} == {"Software": "medtransfer"}
    blob = out.read_bytes()
    for canary in (*CANARIES, str(tmp_path), "Matplotlib"):
        assert canary.encode() not in blob


def test_overlay_rejects_mismatched_shapes(tmp_path) -> None:
    with pytest.raises(ValueError, match="same size"):
        save_overlay(tmp_path / "x.png", np.zeros((32, 32)), np.zeros((16, 16)))
    assert not (tmp_path / "x.png").exists()
