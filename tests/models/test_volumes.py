"""Volume models: 2.5D slices with attention-MIL, ACS-converted ImageNet backbones, native 3D networks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medtransfer.config import ModelConfig, load_config
from medtransfer.data.spec import InputSpec
from medtransfer.errors import CheckpointError, ConfigError
from medtransfer.models import checkpoint as ck
from medtransfer.models.backbones import BACKBONES, get_backbone, load_backbone, weights_fingerprint
from medtransfer.models.card import ModelCard
from medtransfer.models.classifier import Classifier, SliceClassifier, build_model, get_path
from medtransfer.models.volumes import ACSConv, AttentionMILHead, convert_to_acs, slice_stack
from tests.models.test_card import make_card

torch.set_num_threads(2)

SHAPE = (2, 1, 16, 32, 32)  # (N, C, D, H, W)
KINDS = [("efficientnet_lite0", "slices", "imagenet"), ("resnet18", "slices", "none"),
         ("efficientnet_lite0", "acs", "imagenet"), ("resnet18", "acs", "none"), ("resnet10_3d", "native", "none")]


def _build(backbone: str, volume: str, weights: str = "none", **kw) -> Classifier:
    torch.manual_seed(0)
    return build_model(backbone, ["a", "b"], weights=weights, volume=volume, **kw)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setenv("MEDTRANSFER_OFFLINE", "1")


# -- every kind: the model contract ------------------------------------------------------------------------
@pytest.mark.parametrize("backbone,volume,weights", KINDS)
def test_each_kind_trains_forward_and_backward_and_its_head_takes_the_cached_features(backbone, volume, weights):
    model = _build(backbone, volume, weights)
    assert model.volume == volume and model.slice_context == (3 if volume == "slices" else None)
    x = torch.randn(SHAPE)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 1)
    F.binary_cross_entropy_with_logits(logits, torch.tensor([[0.0], [1.0]])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # the loss reaches every parameter, the first (pretrained) conv included
    assert get_path(model.backbone, model.spec.first_conv).weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        feats = model.features(x)
        expected = (2, 16, model.spec.feature_dim) if volume == "slices" else (2, model.spec.feature_dim)
        assert feats.shape == expected
        # linear probe / gradual head phase: the head on cached features gives the forward's logits
        torch.testing.assert_close(model.head(feats), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone,volume,weights", KINDS)
def test_stages_freeze_unfreeze_and_param_groups_cover_every_parameter(backbone, volume, weights):
    model = _build(backbone, volume)
    model._check_stages()
    groups = model.param_groups(1e-3, 0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == 1e-3
    model.freeze_backbone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("head.")}
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, _BatchNorm))
    model.unfreeze(1)
    assert all(p.requires_grad for p in model.stages()[-2].parameters())
    assert not any(p.requires_grad for p in model.stages()[0].parameters())


@pytest.mark.parametrize("backbone,volume,weights", KINDS)
def test_save_load_roundtrip_rebuilds_the_same_model_from_the_card(tmp_path, offline, backbone, volume, weights):
    model = _build(backbone, volume).eval()
    card = make_card(backbone=backbone, input=InputSpec(size=SHAPE[2:]), volume=volume,
                     slice_context=model.slice_context)
    ck.save_model(model, tmp_path / "run", card)
    loaded, loaded_card = ck.load_model(tmp_path / "run")
    assert loaded_card.volume == volume and loaded_card.slice_context == model.slice_context
    assert type(loaded) is type(model) and loaded.volume == volume
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    if volume == "slices":
        assert torch.equal(loaded.head.last_attention, model.head.last_attention)


def test_a_card_that_names_another_volume_kind_is_refused_at_save(tmp_path):
    model = _build("resnet18", "acs")
    card = make_card(backbone="resnet18", input=InputSpec(size=(16, 32, 32)), volume="slices", slice_context=3)
    with pytest.raises(CheckpointError, match="volume=model.volume"):
        ck.save_model(model, tmp_path, card)


# -- slices ------------------------------------------------------------------------------------------------
def test_slice_attention_has_one_weight_per_slice_summing_to_one_and_is_kept_detached():
    model = _build("efficientnet_lite0", "slices").train()
    x = torch.randn(3, 1, 7, 32, 32)
    model(x).sum().backward()
    att = model.head.last_attention
    assert att.shape == (3, 7) and not att.requires_grad and (att >= 0).all()
    torch.testing.assert_close(att.sum(1), torch.ones(3))
    assert model.slice_attention() is att
    assert isinstance(model.head, AttentionMILHead)


def test_attention_pooling_is_the_gated_formula_of_ilse_et_al():
    torch.manual_seed(0)
    head = AttentionMILHead(6, 2, hidden=4, dropout=0.0).eval()
    h = torch.randn(2, 5, 6)
    logits = head(h)
    v, u, w = head.attention_v, head.attention_u, head.attention_w
    scores = (torch.tanh(h @ v.weight.T + v.bias) * torch.sigmoid(h @ u.weight.T + u.bias)) @ w.weight.T + w.bias
    a = torch.softmax(scores[..., 0], dim=1)
    torch.testing.assert_close(head.last_attention, a)
    torch.testing.assert_close(logits, (a[..., None] * h).sum(1) @ head.linear.weight.T + head.linear.bias)


def test_slice_stack_gives_adjacent_slices_as_rgb_with_edges_replicated():
    x = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 1, 4, 2, 2)
    s = slice_stack(x, 3)
    assert s.shape == (2, 4, 3, 2, 2)
    assert torch.equal(s[1, 2], x[1, 0, 1:4])  # (s-1, s, s+1)
    assert torch.equal(s[0, 0], torch.stack([x[0, 0, 0], x[0, 0, 0], x[0, 0, 1]]))
    assert torch.equal(s[0, 3], torch.stack([x[0, 0, 2], x[0, 0, 3], x[0, 0, 3]]))
    assert torch.equal(slice_stack(x.expand(2, 2, 4, 2, 2), 1)[1, 2], x[1, :, 2].expand(2, 2, 2))
    with pytest.raises(ConfigError, match="slice_context=1"):
        slice_stack(x.expand(2, 2, 4, 2, 2), 3)


@pytest.mark.parametrize("backbone,weights", [("efficientnet_lite0", "imagenet"), ("resnet18", "none")])
def test_three_slice_context_feeds_the_unchanged_pretrained_conv_what_a_2d_rgb_model_sees(backbone, weights):
    model = _build(backbone, "slices", weights).eval()
    spec = get_backbone(backbone)
    torch.manual_seed(0)
    reference = load_backbone(backbone, weights)
    conv = get_path(model.backbone, spec.first_conv)
    assert conv.in_channels == 3 and torch.equal(conv.weight, get_path(reference, spec.first_conv).weight)
    rgb = build_model(backbone, ["a", "b"], weights="none", in_channels=3).eval()
    rgb.load_state_dict(model.state_dict(), strict=False)  # same backbone; heads differ
    x = torch.randn(1, 1, 5, 32, 32)
    (g_mean,), (g_std,) = spec.input_stats(1)
    triplet = x[:, 0, 1:4] * g_std + g_mean  # slices 1, 2, 3 → RGB input of slice 2, in [0, 1] units
    triplet = (triplet - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x)[:, 2], rgb.features(triplet), rtol=1e-4, atol=1e-4)


def test_single_slice_context_takes_several_channels_and_three_needs_one():
    model = _build("efficientnet_lite0", "slices", in_channels=2, slice_context=1).eval()
    assert model.slice_context == 1 and get_path(model.backbone, "_conv_stem").in_channels == 2
    with torch.no_grad():
        assert model(torch.randn(1, 2, 6, 32, 32)).shape == (1, 1)
    with pytest.raises(ConfigError, match="slice_context=1"):
        _build("efficientnet_lite0", "slices", in_channels=2, slice_context=3)


def test_chunked_encoding_equals_encoding_all_slices_at_once():
    model = _build("efficientnet_lite0", "slices").eval()
    x = torch.randn(2, 1, 9, 32, 32)
    with torch.no_grad():
        model.chunk_size = None
        whole = model.features(x)
        model.chunk_size = 5  # chunks cross volume boundaries (18 slices: 5, 5, 5, 3)
        chunked = model.features(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_chunked_checkpointed_training_gives_the_gradients_of_one_pass():
    # BatchNorm statistics frozen (train.bn: frozen): in training mode each chunk would otherwise normalise
    # with its own batch statistics
    model = _build("resnet18", "slices")
    x = torch.randn(2, 1, 5, 32, 32)

    def grads(chunk: int | None, use_checkpoint: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = copy.deepcopy(model)
        m.bn_frozen, m.chunk_size, m.checkpoint_chunks = True, chunk, use_checkpoint
        m.train()
        torch.manual_seed(1)  # the head's dropout draws the same mask
        loss = m(x).sum()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    loss_a, grad_a = grads(None, False)
    loss_b, grad_b = grads(4, True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-3, atol=1e-5)


def test_checkpointing_recomputes_chunks_without_counting_batchnorm_statistics_twice():
    model = _build("resnet18", "slices")
    x = torch.randn(2, 1, 6, 32, 32)
    calls: list[int] = []
    stem = get_path(model.backbone, "conv1")
    stem.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))

    def step(use_checkpoint: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:
        m = copy.deepcopy(model)
        m.chunk_size, m.checkpoint_chunks = 4, use_checkpoint
        m.train()
        calls.clear()
        torch.manual_seed(1)  # the head's dropout draws the same mask
        m(x).sum().backward()
        buffers = {n: b.clone() for n, b in m.named_buffers()}
        return buffers, {n: p.grad for n, p in m.named_parameters()}, list(calls)

    buf_plain, grad_plain, calls_plain = step(False)
    buf_ckpt, grad_ckpt, calls_ckpt = step(True)
    assert calls_plain == [4, 4, 4]  # 12 slices in chunks of 4
    assert calls_ckpt == [4, 4, 4, 4, 4, 4]  # ... and each chunk recomputed once in backward
    for name, b in buf_plain.items():
        assert torch.equal(buf_ckpt[name], b), name  # running stats and num_batches_tracked updated once
    for name, g in grad_plain.items():
        torch.testing.assert_close(grad_ckpt[name], g, rtol=1e-4, atol=1e-6)


def test_slices_cam_layer_outputs_per_chunk_map_to_one_3d_map_per_volume():
    model = _build("efficientnet_lite0", "slices").eval()
    model.chunk_size = 3
    seen: list[torch.Tensor] = []
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 1, 4, 32, 32)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert [len(o) for o in seen] == [3, 3, 2]  # one call per chunk, in slice order
    maps = model.cam_reshape()(torch.cat(seen))
    assert maps.shape == (2, 1280, 4, 1, 1)
    assert torch.equal(maps[1, :, 0], seen[1][1])  # volume 1, slice 0 is flat slice 4


@pytest.mark.parametrize("backbone,volume", [("efficientnet_lite0", "acs"), ("resnet10_3d", "native")])
def test_3d_cam_layer_is_already_a_volume_map(backbone, volume):
    model = _build(backbone, volume).eval()
    seen: list[torch.Tensor] = []
    model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 32, 32))
    assert model.cam_reshape() is None and len(seen) == 1 and seen[0].ndim == 5 and seen[0].shape[0] == 2


# -- ACS --------------------------------------------------------------------------------------------------
def _parts(acs: ACSConv) -> list[slice]:
    return [slice(o0, o1) for o0, o1, *_ in acs.parts]


@pytest.mark.parametrize("groups", [1, 6])
def test_acs_parts_are_the_2d_conv_on_axial_coronal_and_sagittal_planes(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups)
    acs = ACSConv(conv)
    x = torch.randn(2, 6, 5, 7, 8)
    out = acs(x)
    assert out.shape == (2, 6, 5, 7, 8)
    (axial, coronal, sagittal), parts = _parts(acs), acs.parts
    cin = [slice(i0, i1) for _, _, i0, i1, _ in parts]  # groups=1: every part reads every input channel

    def conv2d(planes: torch.Tensor, k: int) -> torch.Tensor:
        out_part = slice(parts[k][0], parts[k][1])
        return F.conv2d(planes[:, cin[k]], conv.weight[out_part], conv.bias[out_part], padding=1, groups=parts[k][4])

    for d in range(5):  # axial: slice by slice, the H-W plane
        torch.testing.assert_close(out[:, axial, d], conv2d(x[:, :, d], 0))
    for h in range(7):  # coronal: the D-W plane at each row
        torch.testing.assert_close(out[:, coronal, :, h], conv2d(x[:, :, :, h], 1))
    for w in range(8):  # sagittal: the D-H plane at each column
        torch.testing.assert_close(out[:, sagittal, :, :, w], conv2d(x[:, :, :, :, w], 2))
    assert [p[1] - p[0] for p in parts] == [2, 2, 2]


def test_acs_stride_and_tf_same_padding_follow_each_axis():
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    torch.manual_seed(0)
    conv = Conv2dDynamicSamePadding(3, 6, 3, stride=2, bias=False)
    acs = ACSConv(conv)
    assert acs.pads is None
    x = torch.randn(1, 3, 5, 9, 10)
    out = acs(x)
    assert out.shape == (1, 6, 3, 5, 5)  # TF "SAME": ceil(L / 2) on every axis
    axial = _parts(acs)[0]
    for d in range(3):  # depth 5 is padded (1, 1): output depth d is centred on input slice 2d
        torch.testing.assert_close(out[:, axial, d], conv(x[:, :, 2 * d])[:, axial])
    plain = ACSConv(nn.Conv2d(3, 6, 3, stride=2, padding=1))  # PyTorch padding: floor((L + 2 - 3) / 2) + 1
    assert plain(x).shape == (1, 6, 3, 5, 5)
    assert ACSConv(nn.Conv2d(3, 6, 1, stride=2))(x).shape == (1, 6, 3, 5, 5)


def test_acs_refuses_what_it_cannot_convert():
    with pytest.raises(ConfigError, match="square"):
        ACSConv(nn.Conv2d(3, 3, (1, 3)), "layer.x")
    with pytest.raises(ConfigError, match="padding_mode"):
        ACSConv(nn.Conv2d(3, 3, 3, padding_mode="reflect"))

    class Odd(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ConfigError, match="overrides"):
        ACSConv(Odd(3, 3, 3))
    with pytest.raises(ConfigError, match="cannot be converted"):
        _build("convnext_tiny", "acs")
    with pytest.raises(ConfigError, match="LayerNorm2d"):
        convert_to_acs(load_backbone("convnext_tiny", "none"))


@pytest.mark.parametrize("backbone,weights", [("efficientnet_lite0", "imagenet"), ("resnet18", "none")])
def test_acs_conversion_keeps_every_pretrained_tensor_and_the_parameter_count(backbone, weights):
    torch.manual_seed(0)
    net2d = load_backbone(backbone, weights)
    state = {k: v.clone() for k, v in net2d.state_dict().items()}
    n_params = sum(p.numel() for p in net2d.parameters())
    momenta = [m.momentum for m in net2d.modules() if isinstance(m, nn.BatchNorm2d)]
    net3d = convert_to_acs(net2d)
    assert sum(p.numel() for p in net3d.parameters()) == n_params
    after = net3d.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    bns = [m for m in net3d.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(type(m) is nn.BatchNorm3d for m in bns) and [m.momentum for m in bns] == momenta
    assert not [m for m in net3d.modules() if isinstance(m, nn.Conv2d)]
    # a 2D checkpoint loads into the converted network as it is
    net3d.load_state_dict(state)


def test_acs_model_on_a_volume_of_identical_slices_keeps_the_2d_models_axial_evidence():
    """A volume made of one image repeated: every axial part sees that image, as the 2D model did."""
    model2d = _build("resnet18", None).eval()
    model3d = copy.deepcopy(model2d)
    convert_to_acs(model3d.backbone)
    conv2d, conv3d = model2d.backbone.conv1, model3d.backbone.conv1
    img = torch.randn(1, 1, 32, 32)
    vol = img[:, :, None].expand(1, 1, 8, 32, 32).contiguous()
    with torch.no_grad():
        out2d, out3d = conv2d(img), conv3d(vol)
    axial = _parts(conv3d)[0]
    for d in range(1, out3d.shape[2] - 1):  # away from the zero-padded ends of the depth axis
        torch.testing.assert_close(out3d[:, axial, d], out2d[:, axial])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, s in BACKBONES.items() if s.spatial_dims == 2 and s.acs])
def test_every_acs_capable_backbone_runs_on_volumes(name):
    model = _build(name, "acs").eval()
    seen: list[torch.Tensor] = []
    model.cam_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    depth = 32 if name.startswith("densenet") else 8  # DenseNet's transitions pool depth without padding
    with torch.no_grad():
        feats = model.features(torch.randn(1, 1, depth, 32, 32))
    assert feats.shape == (1, model.spec.feature_dim) and seen[0].ndim == 5


# -- native ------------------------------------------------------------------------------------------------
def test_native_3d_network_has_no_imagenet_weights_and_takes_a_local_file(tmp_path):
    spec = get_backbone("resnet10_3d")
    assert spec.spatial_dims == 3 and not spec.acs
    with pytest.raises(ConfigError, match="without ImageNet weights"):
        load_backbone("resnet10_3d", "imagenet")
    with pytest.raises(ConfigError, match="without ImageNet weights"):
        weights_fingerprint("resnet10_3d", "imagenet")
    torch.manual_seed(3)
    ref = load_backbone("resnet10_3d", "none")
    path = tmp_path / "medicalnet_like.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")}},
               path)  # MedicalNet's layout: DataParallel prefix, no classification layer
    model = build_model("resnet10_3d", ["a", "b"], weights=str(path), volume="native")
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)
    assert model.backbone.conv1.in_channels == 1


def test_native_first_conv_tiles_to_several_channels():
    model = _build("resnet10_3d", "native", in_channels=2).eval()
    ref = _build("resnet10_3d", "native").eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():  # the same volume in both channels gives the one-channel network's features
        torch.testing.assert_close(model.features(x.expand(1, 2, 16, 32, 32)), ref.features(x), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("backbone,volume,match", [
    ("resnet10_3d", None, "3D network"),
    ("resnet18", "native", "2D ImageNet backbone"),
    ("resnet10_3d", "slices", "3D network"),
    ("vit_b_16", "acs", "cannot be converted"),
    ("resnet18", "voxels", "unknown model.volume"),
])
def test_backbone_and_volume_kind_must_fit(backbone, volume, match):
    with pytest.raises(ConfigError, match=match):
        build_model(backbone, ["a", "b"], weights="none", volume=volume)


def test_image_models_are_unchanged_and_refuse_nothing_new():
    model = _build("efficientnet_lite0", None)
    assert type(model) is Classifier and model.volume is None and model.slice_context is None
    assert not isinstance(model, SliceClassifier)


# -- config and card ---------------------------------------------------------------------------------------
def test_config_volume_fields_and_native_defaults():
    assert ModelConfig().volume == "slices" and ModelConfig().slice_context == 3
    native = load_config(None, ["model.volume=native"]).model
    assert (native.backbone, native.weights) == ("resnet10_3d", "none")
    assert load_config(None, ["model.backbone=resnet18_3d"]).model.volume == "native"
    own = load_config(None, ["model.volume=native", "model.backbone=resnet18_3d", "model.weights=w.pth"]).model
    assert (own.backbone, own.weights) == ("resnet18_3d", "w.pth")
    assert ModelConfig.model_fields["volume"].description and ModelConfig.model_fields["slice_context"].description
    with pytest.raises(ConfigError, match="2D ImageNet backbone"):
        load_config(None, ["model.volume=native", "model.backbone=resnet18"])
    with pytest.raises(ConfigError, match="without ImageNet weights"):
        load_config(None, ["model.volume=native", "model.weights=imagenet"])
    with pytest.raises(ConfigError, match="use it with model.volume=native"):
        load_config(None, ["model.volume=acs", "model.backbone=resnet10_3d"])
    with pytest.raises(ConfigError, match="slice_context"):
        load_config(None, ["model.slice_context=2"])


def test_config_lists_exactly_the_tables_3d_networks():
    assert set(ModelConfig.NATIVE_BACKBONES) == {n for n, s in BACKBONES.items() if s.spatial_dims == 3}
    assert get_backbone(ModelConfig.NATIVE_DEFAULT).spatial_dims == 3


def test_card_records_the_volume_kind_and_checks_it(tmp_path):
    card = make_card(backbone="efficientnet_lite0", input=InputSpec(size=(16, 32, 32)), volume="slices",
                     slice_context=1)
    card.save(tmp_path / "model_card.json")
    assert ModelCard.load(tmp_path / "model_card.json") == card
    assert make_card().volume is None and make_card().slice_context is None  # images: unchanged
    bad = [dict(input=InputSpec(size=(16, 32, 32))),  # a volume card must say which model
           dict(input=InputSpec(size=(32, 32)), volume="acs"),
           dict(input=InputSpec(size=(16, 32, 32)), volume="acs", slice_context=3),
           dict(input=InputSpec(size=(16, 32, 32)), volume="native")]  # efficientnet_lite0 is not 3D
    for kw in bad:
        with pytest.raises(ValueError):
            make_card(**kw)
