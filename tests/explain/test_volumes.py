"""Saliency for volumes (N, C, D, H, W): explain, overlays, region hints, sanity and deletion checks, explain_run.

Stand-in models honour the volume-model contract (models/volumes.py): ``Tiny3D`` has a 3D CAM layer (as ``acs`` and
``native``); ``TinySlices`` encodes every slice with a 2D conv net (CAM layer output (N*D, C, h, w), mapped to
(N, C, D, h, w) by ``cam_reshape()``) and pools the slices with attention (``head.last_attention``), as ``slices``
does. Volumes are not cubes (D, H, W = 12, 16, 20) so that a mixed-up axis shows.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from medtransfer.explain import run as run_module
from medtransfer.explain.faithfulness import deletion_scores
from medtransfer.explain.overlay import save_overlay
from medtransfer.explain.regions import body_mask, region_hint
from medtransfer.explain.run import INDEX_COLUMNS, explain_run
from medtransfer.explain.saliency import METHODS, explain
from medtransfer.explain.sanity import sanity_check
from tests.factories import CANARIES, write_nifti

SHAPE = (12, 16, 20)  # D, H, W


class Tiny3D(nn.Module):
    """Native-3D stand-in: Conv3d block, strided Conv3d block (the CAM layer, half resolution), pooling, linear.

    ``region``: pool only over this box of the CAM map (then the logit depends on that region alone).
    """

    def __init__(self, in_channels: int = 1, width: int = 4, n_out: int = 1,
                 region: tuple[slice, slice, slice] | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv3d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(width, n_out)
        self.region = region

    def features(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.block(self.stem(x))
        if self.region is not None:
            fmap = fmap[(slice(None), slice(None), *self.region)]
        return fmap.mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def cam_layer(self) -> nn.Module:
        return self.block

    def cam_reshape(self) -> None:
        return None

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.block, self.head]


class AttentionMIL(nn.Module):
    """Attention-MIL pooling (Ilse et al. 2018) over slices, then a linear layer; keeps ``last_attention`` (N, S)."""

    def __init__(self, dim: int, n_out: int, hidden: int = 8) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.fc = nn.Linear(dim, n_out)
        self.last_attention: torch.Tensor | None = None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.attention(f)[..., 0], dim=1)
        self.last_attention = a.detach()
        return self.fc((a[..., None] * f).sum(dim=1))


class TinySlices(nn.Module):
    """2.5D stand-in: a 2D conv net per slice (``chunk`` slices per encoder call), attention-MIL over slices."""

    def __init__(self, in_channels: int = 1, width: int = 4, n_out: int = 1, chunk: int | None = None) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = AttentionMIL(width, n_out)
        self.chunk = chunk
        self._depth = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        self._depth = d
        slices = x.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w)
        parts = slices.split(self.chunk) if self.chunk else (slices,)
        f = torch.cat([self.encoder(p) for p in parts]).mean(dim=(2, 3))
        return f.view(n, d, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def cam_layer(self) -> nn.Module:
        return self.encoder[4]

    def cam_reshape(self):  # noqa: ANN201
        def to_volume(t: torch.Tensor) -> torch.Tensor:  # (N*D, C, h, w) -> (N, C, D, h, w)
            return t.reshape(-1, self._depth, *t.shape[1:]).transpose(1, 2)

        return to_volume

    def stages(self) -> list[nn.Module]:
        return [self.encoder[:3], self.encoder[3:], self.head]


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model.eval()


def _detector(model: nn.Module) -> nn.Module:
    """Fixed weights that respond to a bright blob: box filters with a threshold, positive head (and attention)."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                m.weight.fill_(1.0 / m.weight[0].numel())
                m.bias.fill_(-0.5 if m is convs[0] else 0.0)  # the first conv thresholds the noise away
            elif isinstance(m, nn.Linear):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model.eval()


def _blob_volumes(n: int, centres: list[tuple[int, int, int]], *, seed: int = 0, extra: tuple | None = None
                  ) -> torch.Tensor:
    """Noise (std 0.2) with a bright 3x3x3 cube (+3) at each centre (and at ``extra`` in every volume)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.randn(n, 1, *SHAPE, generator=g)
    for i, c in enumerate(centres):
        for z, y, xx in [c] + ([extra] if extra else []):
            x[i, 0, z - 1:z + 2, y - 1:y + 2, xx - 1:xx + 2] += 3.0
    return x


def _peak(m: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(int(m.argmax()), tuple(m.shape)))


# ---------------------------------------------------------------------------------------------------- explain


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["3d", "slices"])
def test_every_method_gives_volume_maps_and_batched_equals_per_volume(method: str, kind: str) -> None:
    # Grad-CAM of a slices model that encodes its slices in chunks (the CAM layer runs once per chunk)
    model = _seeded(Tiny3D() if kind == "3d" else TinySlices(chunk=5 if method == "gradcam" else None))
    x = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
    kw = {"n_steps": 4} if method == "integrated_gradients" else {}
    sm = explain(model, x, method=method, internal_batch_size=64, **kw)
    assert sm.maps.shape == sm.raw.shape == (2, 1, *SHAPE)
    assert torch.isfinite(sm.raw).all() and sm.maps.min() >= 0 and sm.maps.max() <= 1
    assert (sm.maps.flatten(1).std(dim=1) > 0).all(), "constant map"
    single = torch.cat([explain(model, x[i:i + 1], method=method, internal_batch_size=64, **kw).maps
                        for i in range(2)])
    torch.testing.assert_close(sm.maps, single, rtol=1e-4, atol=1e-5)
    if kind == "slices":
        assert sm.attention is not None and sm.attention.shape == (2, SHAPE[0])
        torch.testing.assert_close(sm.attention.sum(dim=1), torch.ones(2))
    else:
        assert sm.attention is None


def test_3d_gradcam_is_captums_layer_gradcam_upsampled_trilinear() -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    model = _seeded(Tiny3D(n_out=3), seed=2)
    x = torch.randn(2, 1, *SHAPE)
    ours = explain(model, x, method="gradcam", target=2).raw
    coarse = LayerGradCam(model, model.block).attribute(x, target=2)
    ref = LayerAttribution.interpolate(coarse, SHAPE, interpolate_mode="trilinear")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_slices_gradcam_weights_each_slice_by_its_own_gradient() -> None:
    """Per-slice channel weights: a slice that does not reach the logit gets a zero map (a global weight per
    channel, averaged over all slices, would give it the other slices' weights times its activations)."""
    model = _seeded(TinySlices(), seed=3)

    class OneSlice(nn.Module):  # the logit sees slice 4 only
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.head = model.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.head.fc(self.inner.features(x)[:, 4])

        def cam_layer(self) -> nn.Module:
            return self.inner.cam_layer()

        def cam_reshape(self):  # noqa: ANN201
            return self.inner.cam_reshape()

    x = torch.rand(1, 1, *SHAPE) + 0.5
    raw = explain(OneSlice(), x, method="gradcam").raw[0, 0]
    assert raw[4].abs().max() > 0
    others = torch.cat([raw[:3], raw[6:]])  # trilinear upsampling with D unchanged keeps slices apart
    assert others.abs().max() == 0


def test_planted_signal_gradcam_and_occlusion_peak_at_the_blob() -> None:
    centres = [(3, 11, 5), (8, 4, 14)]
    for model in (_detector(Tiny3D(width=1)), _detector(TinySlices(width=1))):
        x = _blob_volumes(2, centres)
        for method in ("gradcam", "occlusion"):
            sm = explain(model, x, method=method, internal_batch_size=64)
            for i, c in enumerate(centres):
                peak = _peak(sm.maps[i, 0])
                assert max(abs(p - q) for p, q in zip(peak, c, strict=True)) <= 2, (type(model), method, peak, c)
        if isinstance(model, TinySlices):
            att = explain(model, x, method="saliency").attention
            assert [int(a.argmax()) for a in att] in ([3, 8], [2, 8], [4, 8], [3, 7], [3, 9]), att


def test_occlusion_finds_the_region_the_logit_depends_on_not_a_second_blob() -> None:
    """The logit pools the CAM map over one box only; a second, equally bright blob outside it has no effect."""
    region = (slice(0, 3), slice(4, 8), slice(0, 4))  # CAM map (6, 8, 10): voxels z 0-5, y 8-15, x 0-7
    model = _detector(Tiny3D(width=1, region=region))
    x = _blob_volumes(1, [(2, 11, 3)], extra=(9, 3, 15))
    sm = explain(model, x, method="occlusion", internal_batch_size=64)
    z, y, xx = _peak(sm.maps[0, 0])
    assert z <= 5 and 8 <= y and xx <= 7, (z, y, xx)
    assert sm.maps[0, 0, 8:, :6, 12:].max() < 1e-4  # occluding the other blob changes nothing (float noise)


class CountingModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.volumes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.volumes += len(x)
        return self.inner(x)


def test_occlusion_cost_per_volume_is_bounded_and_full_refinement_is_captums_occlusion() -> None:
    from captum.attr import Occlusion

    model = CountingModel(_seeded(Tiny3D()))
    x = torch.randn(2, 1, 16, 32, 48)  # sides multiples of 16: 8 coarse windows per axis
    sm = explain(model, x, method="occlusion", internal_batch_size=64)
    assert 2 * (2 + 512) < model.volumes <= 2 * (2 + 512 + 208), model.volumes  # explain's, occlusion's forward
    assert sm.maps.shape == (2, 1, 16, 32, 48)
    small = _seeded(Tiny3D(n_out=2), seed=4)
    xs = torch.randn(1, 1, 8, 12, 16)  # windows (1, 2, 2): Captum at half-window stride (1, 1, 1)
    ours = explain(small, xs, method="occlusion", target=1, occlusion_refine=1.0, internal_batch_size=256).raw
    ref = Occlusion(small).attribute(xs, sliding_window_shapes=(1, 1, 2, 2), strides=(1, 1, 1, 1), baselines=0.0,
                                     target=1, perturbations_per_eval=256).sum(dim=1, keepdim=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- checks of the maps


def test_sanity_check_on_volumes() -> None:
    x = _blob_volumes(3, [(3, 11, 5), (8, 4, 14), (6, 8, 10)])
    for model in (_seeded(Tiny3D()), _seeded(TinySlices())):
        result = sanity_check(model, x, method="gradcam", target=0)
        assert list(result.table["randomised"]) == ["head", "stage1", "stage0"]
        assert result.status in ("passed", "failed", "not assessed") and np.isfinite(result.mean_spearman)
        grads = sanity_check(model, x, method="saliency", target=0)
        assert grads.passed, grads.table

    def edges(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(torch.diff(images, dim=a, prepend=images.narrow(a, 0, 1)).abs() for a in (2, 3, 4)).sum(dim=1)

    assert not sanity_check(_seeded(Tiny3D()), x, explain_fn=edges).passed
    occ = sanity_check(_seeded(Tiny3D()), x[:1], method="occlusion", target=0, internal_batch_size=64)
    assert "window 2 x 2 x 2 voxels" in occ.maps and "coarse pass" in occ.maps


def _ellipsoid(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    vol = np.where(zz ** 2 / 4 + yy ** 2 / 0.5 + xx ** 2 / 0.6 < 1, 0.7, 0.05)
    vol[(yy ** 2 / 0.1 + (xx - 0.3) ** 2 / 0.05) < 1] = 0.1  # a dark 'lung' tube through every slice
    return vol.astype(np.float32)


def test_region_hint_on_volumes() -> None:
    body = _ellipsoid()
    mask = body_mask(body[None], volume=True)
    assert mask.shape == SHAPE and mask[6, 8, 13]  # the lung tube is inside the body (filled per slice)
    assert not mask[6, 0, 0]
    inside = np.zeros(SHAPE)
    inside[5:8, 6:10, 8:12] = 1
    corner = np.zeros(SHAPE)
    corner[:, :2, :2] = 1  # a column along D in the top-left corner of every axial slice
    hints = region_hint(torch.tensor(np.stack([inside, corner]))[:, None], np.stack([body, body])[:, None])
    assert hints.loc[0, "hint"] == "" and hints.loc[0, "outside_body_mass"] == 0
    assert hints.loc[1, "corner"] == "top_left" and "corner:top_left" in hints.loc[1, "hint"]
    assert hints.loc[1, "outside_body_mass"] == 1 and hints.loc[1, "border_mass"] == 1
    with pytest.raises(ValueError, match="D, H, W"):
        region_hint(np.zeros((1, 1, 12, 16, 16)), body[None, None])


def test_deletion_scores_on_volumes() -> None:
    model = _detector(Tiny3D(width=1))
    with torch.no_grad():  # logit about -3 without the blob, +3 with it: probabilities that can fall
        model.head.weight.fill_(700.0)
        model.head.bias.fill_(-3.0)
    centres = [(3, 11, 5), (8, 4, 14)]
    x = _blob_volumes(2, centres)
    good = torch.zeros(2, *SHAPE)
    for i, (z, y, xx) in enumerate(centres):
        good[i, z - 1:z + 2, y - 1:y + 2, xx - 1:xx + 2] = 1
    res = deletion_scores(model, x, good, 0, steps=8, n_random=3)
    assert (res["deletion_ratio"] < 0.5).all() and (res["insertion_ratio"] > 1.2).all(), res
    res = deletion_scores(model, x, 1 - good, 0, steps=8, n_random=3, insertion=False)  # the blob goes last
    assert (res["deletion_ratio"] > 1.2).all() and "insertion_ratio" not in res, res
    with pytest.raises(ValueError, match="do not match"):
        deletion_scores(model, x, good[:, :6], 0)


# --------------------------------------------------------------------------------------------------- overlay


def _saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    from matplotlib.figure import Figure

    figures: list = []
    real = Figure.savefig

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def test_volume_overlay_is_a_three_pane_montage_plus_the_attention_curve(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    figures = _saved_figures(monkeypatch)
    sal = np.zeros(SHAPE)
    sal[3, 11, 5] = 1.0
    sal = torch.tensor(sal)
    image = np.stack([_ellipsoid(), 1 - _ellipsoid()])  # two CT windows: the first is shown
    out = tmp_path / "CANARYPID9137" / "c1_lesion.png"
    att = torch.softmax(torch.randn(SHAPE[0]), 0)
    save_overlay(out, image, sal[None], title="c1 · lesion · gradcam", attention=att)
    save_overlay(tmp_path / "c1_3d.png", image, sal, orientation="LPS")
    panes = [{ax.get_label(): ax for ax in fig.axes if ax.get_label() and not ax.get_label().startswith("<")}
             for fig in figures]
    assert set(panes[0]) == {"axial", "coronal", "sagittal", "attention"}
    assert set(panes[1]) == {"axis-0 slice", "axis-1 plane", "axis-2 plane"}
    axial, coronal, sagittal = (panes[0][k].images[0].get_array() for k in ("axial", "coronal", "sagittal"))
    assert axial.shape == (16, 20) and coronal.shape == (12, 20) and sagittal.shape == (12, 16)
    np.testing.assert_allclose(axial, _ellipsoid()[3])  # the slice through the peak, first window
    np.testing.assert_allclose(coronal, _ellipsoid()[::-1, 11, :])  # superior at the top
    assert "slice 4/12" in panes[0]["axial"].get_title()
    marked = [ln.get_xdata()[0] for ln in panes[0]["attention"].lines if ln.get_linestyle() == "--"]
    assert marked == [4]
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1] * 0.9
        assert {k: v for k, v in im.info.items() if isinstance(v, str)} == {"Software": "medtransfer"}
    for canary in (*CANARIES, str(tmp_path)):
        assert canary.encode() not in out.read_bytes()
    with pytest.raises(ValueError, match="same size"):
        save_overlay(tmp_path / "x.png", np.zeros((1, 12, 16, 16)), sal)


# ----------------------------------------------------------------------------------------------- explain_run


def _volume_run(root: Path, model: nn.Module) -> SimpleNamespace:
    """A run directory's worth of objects on real NIfTI files (what ``load_run`` gives), with a stand-in model."""
    from medtransfer.data.discovery import index_scans
    from medtransfer.data.spec import InputSpec

    rng = np.random.default_rng(0)
    for label in ("normal", "lesion"):
        for i in range(4):
            vol = rng.normal(100, 20, size=(22, 18, 14)).astype(np.float32)  # i, j, k -> W, H, D after reading
            if label == "lesion":
                vol[5:9, 4:8, 3:6] += 400
            write_nifti(root / "data" / label / f"{label}{i}.nii.gz", vol)
    manifest = index_scans(root / "data", spatial_dims=3)
    card = SimpleNamespace(task="binary", classes=("normal", "lesion"), temperature=1.0,
                           input=InputSpec(size=SHAPE, window="minmax"))
    return SimpleNamespace(path=root / "run", manifest=manifest, card=card, model=model,
                           config=SimpleNamespace(data=SimpleNamespace(cache_dir=None)))


def test_explain_run_on_a_volume_run_writes_montages_and_maps_then_caches(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run = _volume_run(tmp_path, _seeded(TinySlices()))
    run.path.mkdir()
    monkeypatch.setattr(run_module, "load_run", lambda _path: run)
    df = run.manifest.df
    truth = (df["label"] == "lesion").astype(int).to_numpy()
    p = np.zeros(len(df))
    p[truth == 1], p[truth == 0] = [0.9, 0.8, 0.3, 0.7], [0.6, 0.2, 0.1, 0.05]  # TPs, an FN, an FP
    preds = pd.DataFrame({"case_id": df["case_id"].astype(str), "split": "test", "true_lesion": truth,
                          "p_lesion": p, "pred_lesion": (p >= 0.5).astype(int)})
    index_path = explain_run(run.path, method="gradcam", cases=1, predictions=preds)
    index = pd.read_csv(index_path, dtype={"case_id": str, "map_file": str})
    assert list(index.columns) == INDEX_COLUMNS and set(index["kind"]) == {"TP", "FP", "FN"}
    sal_dir = run.path / "saliency"
    assert (sal_dir / "sanity_gradcam.csv").is_file()
    for r in index.itertuples():
        assert (sal_dir / r.file).is_file() and r.file.endswith(".png")
        with np.load(sal_dir / r.map_file, allow_pickle=False) as f:
            sal, raw, peak, att = f["saliency"], f["raw"], f["peak"], f["attention"]
            assert sal.dtype == np.float16 and sal.shape == raw.shape == SHAPE and 0 <= sal.min() <= sal.max() <= 1
            assert tuple(peak) == np.unravel_index(int(np.argmax(sal)), SHAPE)
            assert att.shape == (SHAPE[0],) and abs(float(att.sum()) - 1) < 1e-4
            assert str(f["layout"]) == "DHW" and str(f["orientation"]) == "RAS"
    assert index["outside_body_mass"].between(0, 1).all() and index["deletion_ratio"].notna().all()
    stamps = {q: q.stat().st_mtime_ns for q in sal_dir.rglob("*") if q.is_file()}
    assert explain_run(run.path, method="gradcam", cases=1, predictions=preds) == index_path
    assert {q: q.stat().st_mtime_ns for q in sal_dir.rglob("*") if q.is_file()} == stamps
    (sal_dir / index["map_file"].iloc[0]).unlink()  # a missing map is redone
    explain_run(run.path, method="gradcam", cases=1, predictions=preds)
    assert (sal_dir / index["map_file"].iloc[0]).is_file()


def test_explain_run_cases_by_id_on_a_3d_volume_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _volume_run(tmp_path, _seeded(Tiny3D()))
    run.path.mkdir()
    monkeypatch.setattr(run_module, "load_run", lambda _path: run)
    ids = list(run.manifest.df["case_id"].astype(str)[:2])
    preds = pd.DataFrame({"case_id": ids, "p_lesion": [0.7, 0.4]})
    index = pd.read_csv(explain_run(run.path, method="integrated_gradients", case_ids=ids, predictions=preds),
                        dtype={"case_id": str, "map_file": str})
    assert len(index) == 2 and set(index["case_id"]) == set(ids) and set(index["group"]) == {"requested"}
    for rel in index["map_file"]:
        with np.load(run.path / "saliency" / rel, allow_pickle=False) as f:
            assert "attention" not in f.files and f["saliency"].shape == SHAPE


# --------------------------------------------------------------------------------- the real volume models


@pytest.mark.parametrize(("backbone", "volume"), [("efficientnet_lite0", "slices"), ("efficientnet_lite0", "acs"),
                                                 ("resnet10_3d", "native")])
def test_gradcam_and_saliency_on_the_real_volume_models(backbone: str, volume: str) -> None:
    pytest.importorskip("medtransfer.models.volumes", reason="models/volumes.py has not landed yet")
    from medtransfer.models.classifier import build_model

    torch.manual_seed(0)
    model = build_model(backbone, ["a", "b"], weights="none", volume=volume).eval()
    if volume == "slices":
        model.chunk_size = 6  # several CAM-layer calls per batch: their outputs are put together in slice order
    size = (8, 32, 32) if volume == "slices" else (32, 64, 64)  # 3D nets: CAM map (1, 2, 2), not one voxel
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        before = model(x)
    for method in ("gradcam", "saliency"):
        sm = explain(model, x, method=method)
        assert sm.maps.shape == (2, 1, *size) and torch.isfinite(sm.maps).all()
        # raw, not maps: a random model's Grad-CAM may be all negative (no positive evidence), a zero map
        assert (sm.raw.flatten(1).std(dim=1) > 0).all(), (volume, method)
    if volume == "slices":
        assert sm.attention is not None and sm.attention.shape[0] == 2
    with torch.no_grad():
        assert torch.equal(before, model(x))


@pytest.mark.parametrize("context", [1, 3])
def test_slices_occlusion_reencodes_only_touched_slices_and_equals_full_forward(context: int) -> None:
    """The 2.5D fast path (only the slices a window touches are re-encoded) gives the generic path's map."""
    from medtransfer.models.classifier import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", ["a", "b"], weights="none", volume="slices", slice_context=context).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval-mode BN matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 1, 16, 24, 24)  # one case: the generic path's cost is what this test mostly pays

    class Plain(nn.Module):  # no encode_slices: the generic path re-encodes the whole volume per copy
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.inner(v)

    calls: list[int] = []
    hook = model.backbone.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    fast = explain(model, x, method="occlusion", target=0, internal_batch_size=16)
    fast_slices = sum(calls)
    calls.clear()
    slow = explain(Plain(model), x, method="occlusion", target=0, internal_batch_size=16)
    slow_slices = sum(calls)
    hook.remove()
    assert torch.allclose(fast.raw, slow.raw, atol=1e-5), (fast.raw - slow.raw).abs().max()
    assert fast_slices < slow_slices / 3, (fast_slices, slow_slices)
