"""timm backbones (``timm:<name>``): specs from timm's metadata, grey first conv, weights from the hub cache or a
file, the offline message, the card, Grad-CAM on CNN/ViT/register tokens, slices, and the ``backbones`` listing.

timm's tiny test models (``timm.list_models("test_*")``, random init) stand in for real ones; pretrained weights
are files written here, either as ``--weights-file`` or laid out as a Hugging Face hub cache entry.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.errors import CheckpointError, ConfigError, WeightsUnavailable
from medtransfer.models import backbones as bb
from medtransfer.models import timm_backbones as tb
from medtransfer.models.backbones import get_backbone, list_backbones, weights_available, weights_fingerprint
from medtransfer.models.card import ModelCard
from medtransfer.models.checkpoint import load_model, save_model
from medtransfer.models.classifier import build_model, get_path, vit_tokens_to_map

torch.set_num_threads(2)

#: fast tiny models (< 0.5 s to build), one of each layout: CNN maps, ViT tokens, channels-last maps, fixed size
FAST = ["test_resnet", "test_efficientnet", "test_convnext", "test_byobnet", "test_nfnet", "test_vit", "test_mambaout",
        "test_vit_relpos"]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, no offline switch set, and a hub download that fails like no network."""
    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(bb.OFFLINE_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[str] = []

    def no_network(src, timeout):
        calls.append(src.hf_hub_id)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(tb, "_download", no_network)
    return cache, calls


def put_in_hub_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay ``state`` out as huggingface_hub caches ``repo``'s model.safetensors (refs/main → snapshot)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def rgb_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of timm model ``name`` with its 1000-class head, randomly initialised with ``seed``."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in tb.create_model(name).state_dict().items()}


# -- the spec comes from timm ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, head, first_conv, cam_layer, reshape, prefix", [
    ("test_resnet", "fc", "conv1.0", "layer4", None, 0),
    # feature_info ends at blocks.4 (64 ch); the last feature map is the 1x1 conv head's (256 ch): the CAM layer
    ("test_efficientnet", "classifier", "conv_stem", "bn2", None, 0),
    ("test_convnext", "head.fc", "stem.0", "stages.3", None, 0),
    ("test_vit", "head", "patch_embed.proj", "blocks.5.norm1", "vit_tokens", 1),
    ("test_mambaout", "head.fc", "stem.conv1", "stages.3", "nhwc", 0),
])
def test_the_spec_is_read_from_timms_metadata(name, head, first_conv, cam_layer, reshape, prefix):
    spec = get_backbone(f"timm:{name}")
    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    assert spec.name == f"timm:{name}" and spec.head == head == cfg["classifier"]
    assert spec.first_conv == first_conv == cfg["first_conv"]
    assert (spec.cam_layer, spec.cam_reshape, spec.num_prefix_tokens) == (cam_layer, reshape, prefix)
    assert spec.input_size == cfg["input_size"][-1] == 160
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    assert spec.feature_dim == model.forward_head(model.forward_features(torch.zeros(1, 3, 64, 64)),
                                                  pre_logits=True).shape[-1]
    assert spec.acs is False and spec.spatial_dims == 2
    if cfg.get("hf_hub_id"):
        assert spec.weights == f"hf-hub:{cfg['hf_hub_id']}"


def test_vits_take_any_size_and_fixed_models_keep_theirs():
    assert get_backbone("timm:test_vit").fixed_input_size is False  # built with dynamic_img_size/pad
    assert get_backbone("timm:test_vit_relpos").fixed_input_size is True  # its constructor has no dynamic size
    from medtransfer.config import load_config
    from medtransfer.training.run import resolve_input_spec

    with pytest.raises(ConfigError, match=r"accepts only 160x160.*--image-size 160"):
        resolve_input_spec(load_config(None, ["model.backbone=timm:test_vit_relpos", "input.size=[48, 48]"]))
    spec = resolve_input_spec(load_config(None, ["model.backbone=timm:test_vit", "input.size=[40, 56]"]))
    assert spec.mean == (0.5,) and spec.std == (0.5,)  # timm's pretrained_cfg, averaged for grey input


@pytest.mark.parametrize("name", FAST)
def test_every_layout_builds_with_features_cam_layer_and_stages(name):
    spec = get_backbone(f"timm:{name}")
    torch.manual_seed(0)
    model = build_model(spec.name, ["a", "b", "c"], task="multiclass", weights="none").eval()
    side = 160 if spec.fixed_input_size else 48
    x = torch.randn(2, 1, side, side)
    seen: list[torch.Tensor] = []
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        net = model.backbone  # what timm itself returns as pre-logits features
        ref = net.forward_head(net.forward_features(x), pre_logits=True)
    handle.remove()
    assert logits.shape == (2, 3) and feats.shape == (2, spec.feature_dim)
    torch.testing.assert_close(feats, ref)
    assert isinstance(model.backbone.get_submodule(spec.head), nn.Identity)
    reshape = model.cam_reshape()
    fmap = reshape(seen[-1]) if reshape else seen[-1]
    assert fmap.ndim == 4 and fmap.shape[0] == 2 and fmap.shape[-1] >= 1
    stages = model.stages()
    assert 3 <= len(stages) <= tb.MAX_STAGES + 1 and stages[-1] is model.head
    covered = [id(p) for s in stages for p in s.parameters()]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    model.unfreeze(1)  # gradual unfreezing: the last stage and the head only
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for s in stages[-2:] for p in s.parameters()}
    lrs = [g["lr"] for g in model.param_groups(1.0, 0.5)]
    assert lrs == sorted(lrs) and lrs[-1] == 1.0


def test_distilled_vit_pools_class_and_distillation_tokens_like_timm():
    model = build_model("timm:deit_tiny_distilled_patch16_224", ["a", "b"], weights="none", in_channels=3).eval()
    ref = tb.create_model("deit_tiny_distilled_patch16_224").eval()
    missing = ref.load_state_dict(model.backbone.state_dict(), strict=False).missing_keys
    assert missing == ["head.weight", "head.bias"]  # the distillation head is gone from both
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # timm's pre-logits: the mean of the class and distillation tokens
        torch.testing.assert_close(model.features(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
    assert get_backbone("timm:deit_tiny_distilled_patch16_224").num_prefix_tokens == 2


def test_unknown_models_and_tags_are_refused_with_the_names_timm_has():
    with pytest.raises(ConfigError, match="did you mean timm:test_vit"):
        get_backbone("timm:test_vitt")
    with pytest.raises(ConfigError, match="no pretrained tag 'bogus'.*r160_in1k"):
        get_backbone("timm:test_vit.bogus")
    with pytest.raises(ConfigError, match="unknown timm model"):
        get_backbone("timm:")
    with pytest.raises(ConfigError, match="timm:<name>"):
        get_backbone("convnext_tiny_timm")  # the table's message names the timm route too


# -- grey input and weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, conv", [("test_resnet", "conv1.0"), ("test_vit", "patch_embed.proj")])
def test_grey_first_conv_is_the_sum_of_the_rgb_filters(tmp_path, name, conv):
    state = rgb_state(name)
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    grey = build_model(f"timm:{name}", ["a", "b"], weights=str(path), in_channels=1).eval()
    rgb = build_model(f"timm:{name}", ["a", "b"], weights=str(path), in_channels=3).eval()
    w = get_path(grey.backbone, conv).weight
    assert w.shape[1] == 1
    torch.testing.assert_close(w, state[f"{conv}.weight"].sum(dim=1, keepdim=True))
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():  # a grey image gives what the pretrained RGB network gives for it replicated to RGB
        torch.testing.assert_close(grey.features(x), rgb.features(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_a_pth_weights_file_loads_and_a_wrong_architecture_is_refused(tmp_path):
    state = rgb_state("test_vit", seed=3)
    pth = tmp_path / "vit.pth"
    torch.save({"state_dict": state}, pth)  # a wrapped checkpoint, read with weights_only=True
    model = build_model("timm:test_vit", ["a", "b"], weights=str(pth))
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    other = tmp_path / "resnet.safetensors"
    save_file(rgb_state("test_resnet"), str(other))
    with pytest.raises(CheckpointError, match=r"resnet\.safetensors.*do not match"):
        build_model("timm:test_vit", ["a", "b"], weights=str(other))


def test_offline_without_cached_weights_says_which_repo_where_and_how(hf_cache, monkeypatch):
    cache, calls = hf_cache
    monkeypatch.setenv(bb.OFFLINE_ENV, "1")
    with pytest.raises(WeightsUnavailable) as info:
        build_model("timm:test_vit", ["a", "b"])
    msg = str(info.value)
    for part in ("timm:test_vit", "tag r160_in1k", "MEDTRANSFER_OFFLINE is set", "timm/test_vit.r160_in1k",
                 "model.safetensors", str(cache), "hf download timm/test_vit.r160_in1k",
                 "models--timm--test_vit.r160_in1k", "--weights-file PATH", "--weights none", "efficientnet_lite0"):
        assert part in msg, part
    assert calls == []  # offline: no download attempted
    # the same kind of message as a torchvision backbone's
    monkeypatch.setenv("TORCH_HOME", str(cache.parent / "torch"))
    with pytest.raises(WeightsUnavailable) as tv:
        build_model("resnet18", ["a", "b"])
    for part in ("not available (MEDTRANSFER_OFFLINE is set)", "--weights-file PATH", "--weights none",
                 "efficientnet_lite0"):
        assert part in str(tv.value) and part in msg


def test_hf_hub_offline_and_a_failed_download_are_weights_unavailable(hf_cache, monkeypatch):
    _, calls = hf_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        build_model("timm:test_resnet", ["a", "b"])
    assert calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsUnavailable, match="download failed: OSError: network disabled"):
        build_model("timm:test_resnet.r160_in1k", ["a", "b"])
    assert calls == ["timm/test_resnet.r160_in1k"]
    with pytest.raises(WeightsUnavailable, match="publishes no pretrained weights"):
        build_model("timm:test_mambaout", ["a", "b"])


def test_cached_hub_weights_load_offline_and_are_fingerprinted(hf_cache, monkeypatch):
    cache, calls = hf_cache
    state = rgb_state("test_vit", seed=7)
    path = put_in_hub_cache(cache, "timm/test_vit.r160_in1k", state)
    monkeypatch.setenv(bb.OFFLINE_ENV, "1")
    assert weights_available("timm:test_vit") and not weights_available("timm:test_resnet")
    model = build_model("timm:test_vit", ["a", "b"])
    torch.testing.assert_close(model.backbone.blocks[2].mlp.fc1.weight, state["blocks.2.mlp.fc1.weight"])
    assert calls == []
    fp = weights_fingerprint("timm:test_vit", "imagenet")
    assert fp["file"] == "model.safetensors" and fp["hf_hub_id"] == "timm/test_vit.r160_in1k"
    from medtransfer.digest import sha256_file

    assert fp["sha256"] == sha256_file(path)
    assert (fp["timm_model"], fp["pretrained_tag"], fp["timm_version"]) == ("test_vit.r160_in1k", "r160_in1k",
                                                                            timm.__version__)
    rows = {r["name"]: r for r in list_backbones(cached_timm=True)}
    assert rows["timm:test_vit.r160_in1k"]["available"] is True
    assert "timm:test_vit.r160_in1k" not in {r["name"] for r in list_backbones()}


# -- the card and loading a run ------------------------------------------------------------------------------
def test_card_accepts_timm_names_and_a_run_rebuilds_offline_warning_on_another_timm(hf_cache, monkeypatch, tmp_path,
                                                                                   caplog):
    from medtransfer.data.spec import InputSpec

    model = build_model("timm:test_vit", ["normal", "pneumonia"], weights="none").eval()
    weights = {**weights_fingerprint("timm:test_vit", "none"), "timm_version": "0.0.1"}
    card = ModelCard(backbone="timm:test_vit", task="binary", classes=["normal", "pneumonia"], num_outputs=1,
                     input=InputSpec(size=(32, 32), mean=(0.5,), std=(0.5,)), weights=weights)
    save_model(model, tmp_path / "run", card)
    monkeypatch.setenv(bb.OFFLINE_ENV, "1")  # rebuilding needs no weights: an empty cache, offline
    with caplog.at_level(logging.WARNING):
        loaded, read = load_model(tmp_path / "run")
    assert read.backbone == "timm:test_vit"
    assert any("trained with timm 0.0.1" in r.getMessage() and timm.__version__ in r.getMessage()
               for r in caplog.records)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    for bad in ("timm:", "timm:vit small", "timm:a.b.c"):
        with pytest.raises(ValueError, match="not a timm backbone name"):
            ModelCard(backbone=bad, task="binary", classes=["a", "b"], num_outputs=1)


# -- explain ------------------------------------------------------------------------------------------------
def test_token_map_drops_prefix_tokens_and_follows_the_input_aspect():
    tokens = torch.arange(2 * (5 + 12) * 3, dtype=torch.float32).view(2, 17, 3)
    fmap = vit_tokens_to_map(tokens, prefix=5, hw=(42, 56))  # 3 x 4 patches
    assert fmap.shape == (2, 3, 3, 4)
    for i in range(3):
        for j in range(4):
            assert torch.equal(fmap[:, :, i, j], tokens[:, 5 + 4 * i + j])
    assert vit_tokens_to_map(tokens[:, :14], prefix=5).shape == (2, 3, 3, 3)


def test_gradcam_of_the_reshaped_path_equals_captums(monkeypatch):
    """The token/channels-last path computes Grad-CAM by hand; on a CNN with an identity reshape it must equal
    Captum's LayerGradCam."""
    from medtransfer.explain.saliency import _gradcam

    torch.manual_seed(0)
    model = build_model("timm:test_resnet", ["a", "b", "c"], task="multiclass", weights="none").eval()
    x = torch.randn(3, 1, 48, 48)
    want = _gradcam(model, x, [0, 2, 1])
    monkeypatch.setattr(model, "cam_reshape", lambda: (lambda t: t))
    torch.testing.assert_close(_gradcam(model, x, [0, 2, 1]), want, atol=1e-6, rtol=1e-5)


def test_vit_gradcam_equals_captum_on_a_tap_of_the_token_map():
    """Reference: Captum's LayerGradCam on an identity module that sees the patch tokens as a map (the class token
    routed around it)."""
    from captum.attr import LayerGradCam

    from medtransfer.explain.saliency import _gradcam

    torch.manual_seed(0)
    model = build_model("timm:test_vit", ["a", "b"], weights="none").eval()
    x = torch.randn(2, 1, 48, 48)
    tap = nn.Identity()

    def hook(_m, _i, out):
        fmap = tap(out[:, 1:].reshape(out.shape[0], 3, 3, -1).permute(0, 3, 1, 2))
        return torch.cat([out[:, :1], fmap.flatten(2).transpose(1, 2)], dim=1)

    handle = model.cam_layer().register_forward_hook(hook)
    want = LayerGradCam(model, tap).attribute(x, target=[0, 0]).detach()
    handle.remove()
    got = _gradcam(model, x, [0, 0])
    assert got.shape == (2, 1, 3, 3) and got.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # a 22M-parameter ViT-S: ~15-20 s on two shared cores
def test_explain_a_vit_with_register_tokens_and_every_method():
    import medtransfer as mt

    torch.manual_seed(0)
    model = build_model("timm:vit_small_patch14_reg4_dinov2", ["a", "b"], weights="none").eval()
    assert model.spec.num_prefix_tokens == 5 and model.spec.cam_layer == "blocks.11.norm1"
    x = torch.randn(1, 1, 42, 56)  # 3 x 4 patches of 14 px, plus the class token and 4 registers
    seen: list[torch.Tensor] = []
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen[0].shape[1] == 5 + 12 and model.cam_reshape()(seen[0]).shape == (1, 384, 3, 4)
    tiny = build_model("timm:test_vit", ["a", "b"], weights="none").eval()  # occlusion: forward passes only
    for net, method in ((model, "gradcam"), (model, "integrated_gradients"), (tiny, "occlusion")):
        kw = {"n_steps": 4} if method == "integrated_gradients" else {}
        maps = mt.explain(net, x, method=method, **kw)
        assert maps.maps.shape == (1, 1, 42, 56) and torch.isfinite(maps.maps).all(), method
        assert maps.maps.max() > maps.maps.min(), method


def test_swin_like_channels_last_maps_get_gradcam():
    import medtransfer as mt

    torch.manual_seed(0)
    model = build_model("timm:test_mambaout", ["a", "b"], weights="none").eval()
    maps = mt.explain(model, torch.randn(2, 1, 48, 48), method="gradcam")
    assert maps.maps.shape == (2, 1, 48, 48) and torch.isfinite(maps.maps).all()


# -- volumes ------------------------------------------------------------------------------------------------
def test_slices_volumes_work_through_the_generic_contract_and_acs_is_refused():
    import medtransfer as mt

    torch.manual_seed(0)
    model = build_model("timm:test_vit", ["a", "b"], weights="none", volume="slices").eval()
    x = torch.randn(2, 1, 4, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 1) and model.slice_attention().shape == (2, 4)
    maps = mt.explain(model, x, method="gradcam")
    assert maps.maps.shape == (2, 1, 4, 32, 32) and torch.isfinite(maps.maps).all()
    with pytest.raises(ConfigError, match="cannot be converted to ACS"):
        build_model("timm:test_resnet", ["a", "b"], weights="none", volume="acs")


# -- listing ------------------------------------------------------------------------------------------------
def test_cli_backbones_lists_timm_models_with_their_cache_state(hf_cache):
    cache, _ = hf_cache
    runner = CliRunner()
    put_in_hub_cache(cache, "timm/test_vit.r160_in1k", rgb_state("test_vit"))
    result = runner.invoke(app, ["backbones", "--timm", "test_vit*"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines()
             if "timm:" in line and "│" in line}
    assert {"timm:test_vit.r160_in1k", "timm:test_vit2.r160_in1k", "timm:test_vit3.r160_in1k"} <= set(lines)
    assert lines["timm:test_vit.r160_in1k"].rstrip(" │").endswith("yes")
    assert lines["timm:test_vit2.r160_in1k"].rstrip(" │").endswith("no")
    assert "pretrained timm model(s) match 'test_vit*'" in result.output
    plain = runner.invoke(app, ["backbones"], env={"COLUMNS": "200"})
    assert plain.exit_code == 0 and "timm:test_vit.r160_in1k" in plain.output  # the cached one
    assert "timm:test_vit2" not in plain.output and "--timm [PATTERN]" in plain.output


def test_the_default_listing_does_not_import_timm():
    code = ("import sys; from medtransfer.models.backbones import list_backbones; "
            "list_backbones(cached_timm=True); print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"
