"""Cascading parameter randomisation: a model-dependent map passes, an edge detector fails."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medtransfer.explain.sanity import randomise, sanity_check, spearman_per_image
from tests.explain import tiny_classifier


def edge_detector(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A 'saliency method' that ignores the model: gradient magnitude of the image."""
    gx = F.pad((images[..., :, 1:] - images[..., :, :-1]).abs(), (0, 1))
    gy = F.pad((images[..., 1:, :] - images[..., :-1, :]).abs(), (0, 0, 0, 1))
    return (gx + gy).sum(dim=1)


def _blobs(n: int = 3, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        cx, cy = torch.rand(2, generator=g) * 0.6 + 0.2
        out.append(torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02) + 0.05 * torch.randn(size, size, generator=g))
    return torch.stack(out)[:, None]


def test_model_independent_method_is_not_passed() -> None:
    result = sanity_check(tiny_classifier(), _blobs(), explain_fn=edge_detector)
    assert result.mean_spearman > 0.99 and not result.passed and result.sanity_score < 0.01
    assert list(result.table["randomised"]) == ["head", "stage1", "stage0"]


def test_gradient_map_depends_on_the_weights_and_original_is_untouched() -> None:
    model = tiny_classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = sanity_check(model, _blobs(), method="saliency", target=0)
    assert result.passed and result.mean_spearman < 0.5, result.table
    assert 0 <= result.sanity_score <= 1
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_randomise_changes_every_parameter_of_the_stage() -> None:
    model = tiny_classifier()
    stage = model.stages()[0]
    before = [p.clone() for p in stage.parameters()]
    torch.manual_seed(3)
    randomise(stage)
    changed = [not torch.equal(a, b) for a, b in zip(before, stage.parameters(), strict=True)]
    # conv weight and bias are redrawn; BatchNorm goes back to weight 1 / bias 0 (already its init here)
    assert changed[0] and changed[1]


def test_spearman_constant_maps_are_undefined_not_zero() -> None:
    a = torch.rand(2, 8, 8)
    b = torch.stack([a[0], torch.zeros(8, 8)])
    np.testing.assert_allclose(spearman_per_image(a, b), [1.0, np.nan])


def test_a_check_whose_randomised_maps_are_constant_is_not_assessed_never_passed() -> None:
    """Occlusion of a randomised model gave all-zero maps; counting those pairs as rho = 0 read as a pass."""
    model = tiny_classifier()
    calls = {"n": 0}

    def fn(m: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        # the trained model's maps vary; every randomised model's maps are constant
        return torch.rand(len(images), 8, 8) if calls["n"] == 1 else torch.zeros(len(images), 8, 8)

    result = sanity_check(model, torch.rand(4, 1, 8, 8), explain_fn=fn, target=0)
    assert result.status == "not assessed" and not result.passed, result
    assert np.isnan(result.sanity_score) and "constant for 4 of 4" in result.reason
    assert int(result.table["n_constant"].iloc[-1]) == 4


def test_occlusion_is_checked_on_the_coarse_pass_for_every_model(monkeypatch) -> None:
    """Coarse-to-fine maps refine different regions per model, which alone lowers the correlation (an easier
    pass); the check compares the coarse pass, the same windows for the trained and every randomised model."""
    import medtransfer.explain.sanity as sanity

    seen: list[float | None] = []
    real = sanity.explain

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs.get("occlusion_refine"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sanity, "explain", spy)
    model = tiny_classifier()
    result = sanity_check(model, _blobs(2), method="occlusion", target=0)
    assert seen == [0.0] * (1 + len(model.stages())), seen
    assert "coarse pass" in result.maps and "4 x 4 px" in result.maps
    assert len(result.table) == len(model.stages())
    seen.clear()
    result = sanity_check(model, _blobs(2), method="occlusion", target=0, occlusion_refine=1.0)
    assert seen == [1.0] * (1 + len(model.stages())) and "occlusion_refine=1" in result.maps
