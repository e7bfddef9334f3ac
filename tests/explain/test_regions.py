"""Region hints on synthetic maps: body mask, border, corners."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.explain.regions import body_mask, border_mask, corner_masks, region_hint
from tests.factories import chest_like

SIZE = 64


def _image_with_marker() -> np.ndarray:
    img = chest_like(SIZE, seed=0).astype(np.float32) / 4095
    img[2:8, 2:8] = 1.0  # a bright burned-in marker, separate from the body
    return img


def test_body_mask_keeps_the_body_fills_lungs_and_drops_the_marker() -> None:
    mask = body_mask(_image_with_marker())
    assert mask[SIZE // 2, SIZE // 2] and mask[int(0.45 * SIZE), int(0.33 * SIZE)]  # centre and a (dark) lung
    assert not mask[4, 4] and not mask[0, 0]
    assert 0.3 < mask.mean() < 0.8


def test_blank_image_counts_as_all_body() -> None:
    assert body_mask(np.zeros((SIZE, SIZE))).all()


def test_corner_map_is_flagged_with_the_right_corner() -> None:
    sal = np.zeros((1, 1, SIZE, SIZE), dtype=np.float32)
    sal[0, 0, 1:9, SIZE - 9:SIZE - 1] = 1.0  # top-right corner
    row = region_hint(sal, _image_with_marker()[None]).iloc[0]
    assert row["corner"] == "top_right" and row["corner_mass"] == pytest.approx(1.0)
    assert row["border_mass"] > 0.5 and row["outside_body_mass"] == pytest.approx(1.0)
    assert set(row["hint"].split(";")) == {"corner:top_right", "border", "outside_body"}


def test_central_and_uniform_maps_are_not_flagged() -> None:
    central = torch.zeros(2, 1, SIZE, SIZE)
    central[0, 0, 24:40, 24:40] = 1
    central[1] = 1.0
    df = region_hint(central, torch.from_numpy(_image_with_marker())[None, None].expand(2, 1, SIZE, SIZE))
    assert df.loc[0, "outside_body_mass"] == 0 and df.loc[0, "border_mass"] == 0 and df.loc[0, "hint"] == ""
    assert df.loc[1, "corner_enrichment"] == pytest.approx(1.0) and df.loc[1, "hint"] == ""


def test_masks_have_the_documented_sizes() -> None:
    assert border_mask((100, 100)).sum() == 100 * 100 - 84 * 84
    assert all(m.sum() == 15 * 15 for m in corner_masks((100, 100)).values())


def test_zero_map_has_zero_masses() -> None:
    row = region_hint(np.zeros((1, SIZE, SIZE)), _image_with_marker()[None]).iloc[0]
    assert row["corner_mass"] == 0 and row["hint"] == "" and row["corner"] == ""
