"""explain(): closed-form attributions, batched == per image, model state untouched, DenseNet-121."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtransfer.explain.saliency import METHODS, explain, occlusion_starts, scale_maps
from medtransfer.models.classifier import build_model
from tests.explain import tiny_classifier

SIZE = 16


class LinearModel(nn.Module):
    """logits = sum(w * x) + b: the gradient is w everywhere, IG from 0 is exactly w * x."""

    def __init__(self, w: torch.Tensor, bias: float = 0.3) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(dim=1, keepdim=True) + self.b


@pytest.fixture()
def linear() -> LinearModel:
    g = torch.Generator().manual_seed(0)
    return LinearModel(torch.randn(1, 1, SIZE, SIZE, generator=g))


def test_saliency_of_linear_model_is_abs_weight(linear: LinearModel) -> None:
    x = torch.randn(2, 1, SIZE, SIZE)
    sm = explain(linear, x, method="saliency")
    w = linear.w.detach()[0, 0]
    torch.testing.assert_close(sm.raw[:, 0], w.abs().expand(2, SIZE, SIZE), rtol=0, atol=1e-6)
    torch.testing.assert_close(sm.maps[:, 0], (w.abs() / w.abs().max()).expand(2, SIZE, SIZE))


def test_integrated_gradients_of_linear_model_is_w_times_x(linear: LinearModel) -> None:
    x = torch.randn(3, 1, SIZE, SIZE)
    sm = explain(linear, x, method="integrated_gradients", n_steps=8, internal_batch_size=5)
    w = linear.w.detach()
    torch.testing.assert_close(sm.raw[:, 0], (w * x)[:, 0], rtol=1e-5, atol=1e-6)
    # completeness: attributions sum to f(x) - f(baseline)
    with torch.no_grad():
        diff = (linear(x) - linear(torch.zeros_like(x)))[:, 0]
    torch.testing.assert_close(sm.raw.flatten(1).sum(1), diff, rtol=1e-5, atol=1e-5)
    assert sm.maps.min() >= 0 and sm.maps.amax(dim=(1, 2, 3)).allclose(torch.ones(3))


def test_occlusion_of_linear_model_sums_window_contributions(linear: LinearModel) -> None:
    x = torch.randn(1, 1, SIZE, SIZE)
    sm = explain(linear, x, method="occlusion")
    # every pixel's attribution is the average logit drop over the windows covering it; for a linear model
    # the total over pixels equals sum(w * x) weighted by coverage, so the sign pattern follows w * x
    assert torch.isfinite(sm.raw).all() and sm.maps.shape == (1, 1, SIZE, SIZE)
    top = sm.raw[0, 0].flatten().argmax()
    wx = (linear.w.detach() * x)[0, 0]
    assert wx.flatten()[top] > 0


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_image(method: str) -> None:
    """Per-image scaling, targets and Captum's batching must not mix images (TorchIO's assert_vectorized)."""
    model = tiny_classifier()
    x = torch.randn(3, 1, 32, 32)
    kw = {"n_steps": 4} if method == "integrated_gradients" else {}
    batched = explain(model, x, method=method, **kw)
    single = torch.cat([explain(model, x[i:i + 1], method=method, **kw).maps for i in range(3)])
    assert batched.maps.shape == (3, 1, 32, 32)
    torch.testing.assert_close(batched.maps, single, rtol=1e-4, atol=1e-5)


def test_multilabel_one_map_per_requested_class() -> None:
    model = tiny_classifier(("a", "b", "c"), task="multilabel")
    x = torch.randn(2, 1, 32, 32)
    sm = explain(model, x, method="saliency", target=[0, 2])
    assert sm.maps.shape == (2, 2, 32, 32) and sm.targets.tolist() == [[0, 2], [0, 2]]
    with torch.no_grad():
        p = torch.sigmoid(model.eval()(x))
    torch.testing.assert_close(sm.scores, p[:, [0, 2]])
    with pytest.raises(ValueError, match="out of range"):
        explain(model, x, method="saliency", target=3)


def test_explain_restores_mode_and_requires_grad() -> None:
    model = build_model("efficientnet_lite0", ["a", "b"], weights="none")
    model.freeze_backbone()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    explain(model, torch.randn(1, 1, 32, 32), method="gradcam")
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_scale_maps_handles_zero_and_nonfinite() -> None:
    m = torch.tensor([[[0.0, 0.0]], [[float("nan"), 2.0]]])
    out = scale_maps(m)
    assert torch.isfinite(out).all() and out[0].eq(0).all() and out[1].tolist() == [[0.0, 1.0]]


def test_densenet121_gradcam_and_ig_leave_outputs_unchanged() -> None:
    torch.manual_seed(0)
    model = build_model("densenet121", ["normal", "pneumonia"], weights="none").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        before = model(x)
    sm = explain(model, x, method="gradcam")
    assert torch.isfinite(sm.maps).all() and sm.maps.shape == (2, 1, 64, 64)
    assert (sm.maps.flatten(1).std(dim=1) > 0).all(), "Grad-CAM map is constant"
    ig = explain(model, x[:1], method="integrated_gradients", n_steps=4, internal_batch_size=4)
    assert torch.isfinite(ig.maps).all() and ig.maps.max() == 1
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)


def test_mt_explain_stays_callable_after_the_subpackage_is_imported() -> None:
    import medtransfer as mt
    import medtransfer.explain.run  # noqa: F401  (sets the attribute medtransfer.explain to the subpackage)

    model = mt.build_model("efficientnet_lite0", ["a", "b"], in_channels=1, weights="none").eval()
    maps = mt.explain(model, torch.rand(2, 1, 32, 32), method="saliency")
    assert tuple(maps.maps.shape) == (2, 1, 32, 32)


# ---------------------------------------------------------------------------- coarse-to-fine occlusion


class CountingModel(nn.Module):
    """Wraps a model and counts the images it is run on (every forward pass, any batch size).

    The attribute is not called ``model``: ``explain`` would take it for a Run's model and unwrap it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.inner(x)


def test_occlusion_start_positions_cover_every_pixel_and_coarse_is_a_subset() -> None:
    for length in (1, 5, 16, 50, 64, 100, 128, 224):
        for window in {1, max(1, round(length / 8)), max(1, length // 3), length}:
            fine, coarse = occlusion_starts(length, window)
            assert set(coarse) <= set(fine) and fine == sorted(fine) and coarse == sorted(coarse)
            for starts, most in ((fine, max(1, window // 2)), (coarse, window)):
                covered = torch.zeros(length, dtype=torch.bool)
                for s in starts:
                    covered[s:s + window] = True
                assert covered.all(), (length, window, starts)
                gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
                assert max(gaps, default=0) <= most, (length, window, starts)
    with pytest.raises(ValueError, match="does not fit"):
        occlusion_starts(8, 9)


def test_full_refinement_is_captums_occlusion_at_half_window_stride() -> None:
    """occlusion_refine=1 evaluates every half-stride window: Captum's Occlusion, summed over channels."""
    from captum.attr import Occlusion

    model = tiny_classifier(("a", "b", "c"), task="multiclass").eval()
    x = torch.randn(3, 1, 32, 32)
    ours = explain(model, x, method="occlusion", target=1, occlusion_refine=1.0).raw[:, 0]
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2), baselines=0.0,
                                     target=1).sum(dim=1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    two = LinearModel(torch.randn(1, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(2)))
    x2 = torch.randn(2, 2, SIZE, SIZE)
    ours = explain(two, x2, method="occlusion", occlusion_refine=1.0).raw[:, 0]
    ref = Occlusion(two).attribute(x2, sliding_window_shapes=(2, 2, 2), strides=(2, 1, 1), baselines=0.0,
                                   target=0).sum(dim=1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_coarse_to_fine_matches_the_full_scan_where_the_evidence_is_at_a_bounded_cost() -> None:
    """Evidence only in a 6 x 6 patch: refined there (as the full scan), at <= 2 + 64 + 64 images each."""
    size = 64  # window 8 px: 8 x 8 coarse windows, 15 x 15 half-stride windows
    w = torch.zeros(1, 1, size, size)
    w[..., 20:26, 36:42] = 1.0
    x = torch.rand(2, 1, size, size) + 0.5  # positive evidence: every occluded patch lowers the logit
    full_model, fine_model = CountingModel(LinearModel(w)), CountingModel(LinearModel(w))
    full = explain(full_model, x, method="occlusion", occlusion_refine=1.0).raw[:, 0]
    c2f = explain(fine_model, x, method="occlusion").raw[:, 0]
    assert full_model.images == 2 * (2 + 15 * 15)  # explain's forward, occlusion's reference, the windows
    assert fine_model.images <= 2 * (2 + 64 + 64), fine_model.images
    # every window covering a pixel of the patch overlaps a top coarse window, so all of them were evaluated
    torch.testing.assert_close(c2f[:, 16:30, 32:46], full[:, 16:30, 32:46])
    coarse = explain(LinearModel(w), x, method="occlusion", occlusion_refine=0.0).raw[:, 0]
    assert not torch.allclose(coarse[:, 16:30, 32:46], full[:, 16:30, 32:46])  # the refinement did something
    assert torch.equal(c2f.flatten(1).argmax(1), full.flatten(1).argmax(1))


def test_occlusion_cost_per_image_does_not_grow_with_image_size() -> None:
    model = CountingModel(tiny_classifier().eval())
    for size in (64, 128):
        model.images = 0
        sm = explain(model, torch.randn(2, 1, size, size), method="occlusion")
        assert model.images <= 2 * (2 + 64 + 64), (size, model.images)
        assert torch.isfinite(sm.raw).all() and sm.maps.shape == (2, 1, size, size)
    with pytest.raises(ValueError, match="occlusion_refine"):
        explain(model, torch.randn(1, 1, 32, 32), method="occlusion", occlusion_refine=2.0)
