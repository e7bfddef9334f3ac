"""Deletion curves: a map on the evidence beats random orders; a random map does not."""

from __future__ import annotations

import torch
from torch import nn

from medtransfer.explain.faithfulness import deletion_scores

SIZE = 32


CHECKER = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1  # +-1, fine texture


class RegionModel(nn.Module):
    """logit = 4 * <top-left 8 x 8 region, checkerboard> - 1: evidence lives only there (and blurring removes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * (x[:, :, :8, :8] * CHECKER).mean(dim=(1, 2, 3))[:, None] - 1


def _images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = 0.2 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    x[:, :, :8, :8] += 1.5 * CHECKER
    return x


def test_map_on_the_evidence_has_deletion_ratio_below_one() -> None:
    good = torch.zeros(3, SIZE, SIZE)
    good[:, :8, :8] = 1
    res = deletion_scores(RegionModel(), _images(), good, 0, steps=16, n_random=3)
    assert (res["deletion_ratio"] < 0.5).all(), res
    assert (res["insertion_ratio"] > 1.2).all(), res


def test_random_map_has_deletion_ratio_near_one() -> None:
    rand = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    res = deletion_scores(RegionModel(), _images(), rand, 0, steps=16, n_random=5, insertion=False)
    assert ((res["deletion_ratio"] - 1).abs() < 0.15).all(), res
    assert "insertion_ratio" not in res


def test_batch_size_does_not_change_the_curves() -> None:
    m = torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    a = deletion_scores(RegionModel(), _images(2), m, 0, batch_size=3)
    b = deletion_scores(RegionModel(), _images(2), m, 0, batch_size=64)
    torch.testing.assert_close(torch.tensor(a.to_numpy()), torch.tensor(b.to_numpy()))
