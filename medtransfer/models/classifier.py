"""``Classifier``: a pretrained backbone with its head replaced, and ``build_model`` to make one.

Everything architecture-specific comes from the backbone's :class:`~medtransfer.models.backbones.BackboneSpec`:
the classifier finds the head, first conv, Grad-CAM layer and stages by their dotted paths, so training,
feature caching and saliency code work the same for every backbone.

Volumes (N, C, D, H, W) get one of three models (``model.volume``; building blocks in
:mod:`medtransfer.models.volumes`): ``slices``, a :class:`SliceClassifier` (the 2D backbone encodes every
slice, attention-MIL pools them); ``acs``, a :class:`Classifier` whose 2D backbone was converted to ACS 3D
convolutions; ``native``, a :class:`Classifier` on a 3D network trained from scratch. All honour one contract:
``model(x)`` → logits (N, K); ``model.features(x)`` → what ``model.head`` takes; ``cam_layer()``,
``cam_reshape()``, ``stages()``, ``freeze_backbone()``, ``unfreeze(n)``, ``param_groups(lr, decay)``;
``model.volume`` (None for images) and ``model.slice_context`` say which model it is (the model card records both).
"""

from __future__ import annotations

import copy
import functools
import logging
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medtransfer.data.spec import TASKS
from medtransfer.errors import ConfigError
from medtransfer.models.backbones import BackboneSpec, get_backbone, load_backbone
from medtransfer.models.volumes import (
    SLICE_CHUNK,
    AttentionMILHead,
    check_volume_model,
    convert_to_acs,
    encode_in_chunks,
    slice_stack,
    slices_to_volume_map,
)

logger = logging.getLogger(__name__)


def get_path(root: nn.Module, path: str) -> nn.Module | nn.Parameter | Callable[..., torch.Tensor]:
    """The attribute at dotted ``path`` below ``root`` (a module, a parameter or a bound method)."""
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (``"classifier.1"``, ``"heads.head"``) with ``module``."""
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, module)


class _Group(nn.Module):
    """A stage made of several modules and/or bare parameters (ViT's class token).

    Not registered under the classifier, so the classifier's state_dict is unaffected.
    """

    def __init__(self, items: Sequence[nn.Module | nn.Parameter]) -> None:
        super().__init__()
        for i, item in enumerate(items):
            if isinstance(item, nn.Parameter):
                self.register_parameter(f"p{i}", item)
            else:
                self.add_module(str(i), item)


class Classifier(nn.Module):
    """A backbone without its original head, plus a new head (dropout + linear).

    Args:
        backbone: the ImageNet model from :func:`~medtransfer.models.backbones.load_backbone`; its head
            (``spec.head``) is replaced by ``nn.Identity`` here.
        spec: the backbone's spec.
        num_outputs: 1 for binary, the number of classes otherwise.
        dropout: dropout probability before the new linear layer.
        classes, task: what the outputs mean (kept for convenience; the model card is the record).
        volume: None for images; ``"acs"`` (backbone converted to 3D) or ``"native"`` (a 3D network) for volumes.
        head: a head to use instead of the default dropout + linear (it must take ``features``' output).

    Attributes:
        backbone: the feature extractor.
        head: ``nn.Sequential(Dropout, Linear(spec.feature_dim, num_outputs))`` unless given.
        spec: the backbone spec.
        volume, slice_context: which model this is, for the model card (``slice_context`` is None but for
            :class:`SliceClassifier`).
    """

    slice_context: int | None = None

    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        num_outputs: int,
        *,
        dropout: float = 0.2,
        classes: Sequence[str] = (),
        task: str = "binary",
        volume: str | None = None,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.task = task
        self.volume = volume
        set_path(backbone, spec.head, nn.Identity())
        self.backbone = backbone
        self.spec = spec
        self.num_outputs = int(num_outputs)
        self.head = head if head is not None else nn.Sequential(
            nn.Dropout(dropout), nn.Linear(spec.feature_dim, self.num_outputs))
        self.bn_frozen = False  # set by fine-tuning (train.bn); see train()
        self._input_hw: tuple[int, int] | None = None  # token models: the last input's (H, W), for cam_reshape
        self._check_stages()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features.

        Args:
            x: float tensor (N, C, H, W), or (N, C, D, H, W) for ``acs``/``native``, normalised as the model
                card's ``input`` says.

        Returns:
            float tensor (N, spec.feature_dim).
        """
        if self.spec.feature_map is None:
            if self.spec.cam_reshape == "vit_tokens":
                self._input_hw = (int(x.shape[-2]), int(x.shape[-1]))
            return self.backbone(x).flatten(1)
        fmap = get_path(self.backbone, self.spec.feature_map)(x)  # (N, C, h, w) or (N, C, d, h, w)
        if self.spec.feature_act == "relu":
            fmap = F.relu(fmap)  # never in place: Captum hooks on the CAM layer see this tensor
        pool = F.adaptive_avg_pool2d if fmap.ndim == 4 else F.adaptive_avg_pool3d
        return pool(fmap, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_outputs) for images ``x`` (N, C, H, W) or volumes (N, C, D, H, W)."""
        return self.head(self.features(x))

    def cam_layer(self) -> nn.Module:
        """The module Grad-CAM attributes to (``spec.cam_layer``); see :meth:`cam_reshape`.

        Raises:
            ValueError: the backbone has no Grad-CAM layer (a timm model whose feature layout is not a map or
                ViT tokens); the other attribution methods still work.
        """
        if not self.spec.cam_layer:
            raise ValueError(f"{self.spec.name} has no Grad-CAM layer (its features are neither a feature map nor "
                             "ViT tokens); use method='integrated_gradients' or 'occlusion'")
        return get_path(self.backbone, self.spec.cam_layer)  # type: ignore[return-value]

    def cam_reshape(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function turning the CAM layer's output into a map (N, C, h, w), or None if it already is one.

        ViT tokens (N, P + h*w, C) lose their ``spec.num_prefix_tokens`` P and are laid on the patch grid (the
        last input's aspect decides h and w); channels-last maps (N, h, w, C) are permuted. ``acs``/``native``:
        None, the CAM layer's output is already a 3D map (N, C, d, h, w).
        """
        return self._to_map if self.spec.cam_reshape is not None else None

    def _to_map(self, t: torch.Tensor) -> torch.Tensor:
        if self.spec.cam_reshape == "nhwc":
            return t.permute(0, 3, 1, 2)
        return vit_tokens_to_map(t, prefix=self.spec.num_prefix_tokens, hw=self._input_hw)

    def stages(self) -> list[nn.Module]:
        """Backbone stages from input to output (``spec.stages``), then the head."""
        out: list[nn.Module] = []
        for paths in self.spec.stages:
            items = [get_path(self.backbone, p) for p in paths]
            out.append(items[0] if len(items) == 1 and isinstance(items[0], nn.Module) else _Group(items))
        return [*out, self.head]

    def freeze_backbone(self) -> None:
        """Train the head only: backbone parameters stop requiring grad and its BatchNorm stays in eval."""
        self.unfreeze(0)

    def unfreeze(self, n_stages: int | None = None) -> None:
        """Make the last ``n_stages`` backbone stages trainable (all when None) and freeze the others.

        The head is always trainable. BatchNorm layers in frozen stages stay in eval mode (see :meth:`train`).
        """
        stages = self.stages()[:-1]
        n = len(stages) if n_stages is None else max(0, min(int(n_stages), len(stages)))
        for i, stage in enumerate(stages):
            stage.requires_grad_(i >= len(stages) - n)
        self.head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        """Set training mode, keeping frozen BatchNorm layers in eval mode (fastai's ``bn_splitter`` idea).

        A frozen BatchNorm in train mode would still update its running statistics from the new domain's
        batches, silently changing the "frozen" backbone. With ``self.bn_frozen`` set, every BatchNorm stays
        in eval mode (its affine parameters still train): the pretrained running statistics are kept.
        """
        super().train(mode)
        if mode:
            keep_all = self.bn_frozen
            for m in self.modules():
                params = list(m.parameters(recurse=False))
                if isinstance(m, _BatchNorm) and (keep_all or (params and not any(p.requires_grad for p in params))):
                    m.eval()
        return self

    def param_groups(self, lr: float, decay: float) -> list[dict[str, object]]:
        """Optimizer parameter groups with discriminative learning rates.

        Args:
            lr: the head's learning rate.
            decay: factor per stage below the head: stage k below it gets ``lr * decay**k``.

        Returns:
            One dict per stage, input to output (head last): ``{"params", "lr", "name"}``. Frozen parameters
            are included (the optimiser skips parameters without gradients), so unfreezing later needs no
            new optimiser.
        """
        stages = self.stages()
        names = [f"stage{i}" for i in range(len(stages) - 1)] + ["head"]
        return [{"params": list(s.parameters()), "lr": lr * decay ** (len(stages) - 1 - i), "name": names[i]}
                for i, s in enumerate(stages)]

    def _check_stages(self) -> None:
        covered = {id(p) for s in self.stages() for p in s.parameters()}
        missing = [n for n, p in self.named_parameters() if id(p) not in covered]
        if missing:  # a table bug: these parameters would never get an LR group
            raise RuntimeError(f"{self.spec.name}: stages miss parameters {missing[:5]}")


class SliceClassifier(Classifier):
    """2.5D: a 2D ImageNet backbone encodes every slice of a volume; gated attention-MIL pools the slices.

    ``slice_context=3``: slices (s-1, s, s+1) form the RGB input of slice s (the edge slices repeat), so the
    pretrained first convolution is used unchanged and sees what it was trained on (the grey-normalised input
    is renormalised with the backbone's RGB statistics); the volume must have 1 channel. ``slice_context=1``:
    every slice alone through the grey-adapted first convolution (any number of channels).

    Slices are encoded ``chunk_size`` at a time; while training with gradients each chunk's activations are
    recomputed in backward (activation checkpointing), so peak memory scales with the chunk, not with N * D.
    In training mode BatchNorm layers that are not frozen normalise each chunk with its own statistics.

    Args:
        backbone, spec, num_outputs, dropout, classes, task: as for :class:`Classifier`.
        slice_context: 1 or 3 (see above).
        hidden: size of the attention network.

    Attributes:
        head: :class:`~medtransfer.models.volumes.AttentionMILHead`; ``head.last_attention`` holds the
            attention weights (N, D) of the last forward pass (also :meth:`slice_attention`).
        chunk_size: slices per backbone call (None: all at once).
        checkpoint_chunks: recompute chunk activations in backward when training (set False to keep them).
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, num_outputs: int, *, dropout: float = 0.2,
                 classes: Sequence[str] = (), task: str = "binary", slice_context: int = 3,
                 hidden: int = 128) -> None:
        head = AttentionMILHead(spec.feature_dim, int(num_outputs), hidden=hidden, dropout=dropout)
        super().__init__(backbone, spec, num_outputs, dropout=dropout, classes=classes, task=task, volume="slices",
                         head=head)
        self.slice_context = int(slice_context)
        self.chunk_size: int | None = SLICE_CHUNK
        self.checkpoint_chunks = True
        self._depth = 0  # slices per volume in the last forward pass (for cam_reshape)
        # the input is normalised with the grey statistics (input_stats(1)); the RGB conv wants its own
        (g_mean,), (g_std,) = spec.input_stats(1)
        self._to_rgb = None if self.slice_context != 3 or (set(spec.mean) == {g_mean} and set(spec.std) == {g_std}) \
            else ([g_std / s for s in spec.std], [(g_mean - m) / s for m, s in zip(spec.mean, spec.std, strict=True)])

    def _renormalise(self, chunk: torch.Tensor) -> torch.Tensor:
        scale, shift = (torch.tensor(v, dtype=chunk.dtype, device=chunk.device).view(1, 3, 1, 1)
                        for v in self._to_rgb)  # type: ignore[union-attr]
        return chunk * scale + shift

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled 2D features (B, F) of slice inputs (B, C', H, W): the backbone as a 2D Classifier."""
        return super().features(images)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slice features (N, D, F) of volumes ``x`` (N, C, D, H, W): what the head takes (and the cache stores)."""
        if x.ndim != 5:
            raise ValueError(f"a slices model takes volumes (N, C, D, H, W), got shape {tuple(x.shape)}")
        n, _, d = x.shape[:3]
        self._depth = d
        grads = torch.is_grad_enabled() and self.training and self.checkpoint_chunks and (
            x.requires_grad or any(p.requires_grad for p in self.backbone.parameters()))
        feats = encode_in_chunks(self.encode, slice_stack(x, self.slice_context), chunk_size=self.chunk_size,
                                 use_checkpoint=grads, bn_owner=self.backbone,
                                 to_input=self._renormalise if self._to_rgb is not None else None)
        return feats.view(n, d, -1)

    def slice_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The 2D input of every slice of volumes ``x`` (N, C, D, H, W): a view (N, D, C', H, W).

        Slice s's input depends on slices s-1..s+1 with ``slice_context=3`` (only s with 1), so changing a block
        of slices changes only the inputs of that block and its neighbours: what occlusion exploits.
        """
        return slice_stack(x, self.slice_context)

    def encode_slices(self, inputs: torch.Tensor) -> torch.Tensor:
        """Features (B, F) of slice inputs (B, C', H, W) taken from :meth:`slice_inputs`.

        In eval mode each slice is encoded independently of the others, so features of unchanged slices can
        be reused: ``head(features)`` with some rows re-encoded equals a full forward pass of the changed volume.
        """
        return self.encode(self._renormalise(inputs) if self._to_rgb is not None else inputs)

    def slice_attention(self) -> torch.Tensor | None:
        """The attention weights (N, D) of the last forward pass (``head.last_attention``), or None."""
        return self.head.last_attention  # type: ignore[return-value]

    def cam_reshape(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function mapping the CAM layer's output over all slices (N*D, C, h, w) to (N, C, D, h, w).

        D is read when the function is called: that of the last forward pass. The CAM layer runs once per
        chunk of slices, in slice order; concatenate its outputs before reshaping.
        """
        def to_volume(t: torch.Tensor) -> torch.Tensor:
            fmap = self._to_map(t) if self.spec.cam_reshape is not None else t
            return slices_to_volume_map(fmap, self._depth)

        return to_volume


def vit_tokens_to_map(tokens: torch.Tensor, *, prefix: int = 1, hw: tuple[int, int] | None = None) -> torch.Tensor:
    """ViT tokens (N, prefix + h*w, C) → map (N, C, h, w), dropping the prefix (class and register) tokens.

    Args:
        tokens: the CAM layer's output.
        prefix: tokens before the patch tokens (1: the class token; timm's ``num_prefix_tokens``).
        hw: the input's (H, W): h and w are the factorisation of the patch count closest to its aspect. None:
            a square grid.

    Raises:
        ValueError: no grid fits the patch count.
    """
    n, t, c = tokens.shape
    h, w = _token_grid(t - prefix, hw)
    return tokens[:, prefix:, :].reshape(n, h, w, c).permute(0, 3, 1, 2)


def _token_grid(m: int, hw: tuple[int, int] | None) -> tuple[int, int]:
    side = int(round(max(m, 0) ** 0.5))
    if m > 0 and side * side == m and (hw is None or hw[0] == hw[1]):
        return side, side
    if m <= 0 or hw is None:
        raise ValueError(f"expected prefix + h*w tokens with h = w, got {m} patch tokens")
    aspect = hw[0] / hw[1]
    pairs = [(h, m // h) for h in range(1, m + 1) if m % h == 0]
    return min(pairs, key=lambda p: abs(p[0] / p[1] - aspect))


def adapt_input_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs, reusing its pretrained RGB filters (timm's trick).

    1 channel: the RGB filters are summed, so a grey image gives exactly what the original conv gives for
    the same image replicated to RGB. More channels: the RGB filters are tiled and scaled by 3 / in_channels.
    A one-channel conv (3D networks) is tiled to ``in_channels`` and scaled by 1 / in_channels, so input
    replicated to every channel gives what the original gave.

    Args:
        conv: the first convolution, with 3 (or 1) input channels (any ``nn.Conv2d`` subclass, e.g. TF-same
            padding, or an ``nn.Conv3d``).
        in_channels: the new number of input channels.

    Raises:
        ConfigError: grouped convolution, or a conv that does not take RGB (or one-channel) input.
    """
    if conv.in_channels == in_channels:
        return conv
    if conv.groups != 1 or conv.in_channels not in (1, 3):
        raise ConfigError(f"cannot adapt a first conv with {conv.in_channels} input channels and groups="
                          f"{conv.groups} to {in_channels} channels; expected an RGB conv with groups=1.")
    w = conv.weight.detach()
    if conv.in_channels == 1:
        new_w = w.repeat(1, in_channels, *([1] * (w.ndim - 2))) / in_channels
    elif in_channels == 1:
        new_w = functools.reduce(operator.add, w.split(1, dim=1))  # R + G + B, in a fixed order
    else:
        reps = -(-in_channels // 3)
        new_w = w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :in_channels] * (3.0 / in_channels)
    new = copy.deepcopy(conv)
    new.in_channels = in_channels
    new.weight = nn.Parameter(new_w.clone().contiguous(), requires_grad=conv.weight.requires_grad)
    return new


def disable_inplace_relu(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every module that has an ``inplace`` flag (ReLU, ReLU6, SiLU, Dropout...).

    Captum's hooks (Grad-CAM, DeepLift, guided backprop) fail or give wrong attributions when a hooked
    output is later modified in place. This covers activation *modules* only: torchvision DenseNet's
    functional ``F.relu(inplace=True)`` in its forward is avoided by :meth:`Classifier.features`, which
    runs ``features`` itself and applies a non-inplace ReLU.
    """
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return model


def build_model(
    backbone: str,
    classes: Sequence[str],
    *,
    task: str = "binary",
    in_channels: int = 1,
    weights: str = "imagenet",
    dropout: float = 0.2,
    volume: str | None = None,
    slice_context: int = 3,
) -> Classifier:
    """A classifier for ``classes`` on a pretrained backbone; for volumes, one of three volume models.

    Args:
        backbone: a name from ``medtransfer backbones``.
        classes: class names; binary: exactly 2 (the single output scores ``classes[1]``).
        task: ``"binary"`` (1 sigmoid output), ``"multiclass"`` (softmax) or ``"multilabel"`` (a sigmoid each).
        in_channels: 1 for grey scans (first conv adapted by summing RGB filters) or 3 (or the number of
            stacked CT windows).
        weights: ``"imagenet"``, ``"none"`` (random init) or a local weights file (see ``load_backbone``).
        dropout: dropout before the new linear layer.
        volume: None for images (N, C, H, W). For volumes (N, C, D, H, W) (``model.volume``): ``"slices"``
            (:class:`SliceClassifier`), ``"acs"`` (the 2D backbone as ACS 3D convolutions) or ``"native"``
            (a 3D backbone such as ``resnet10_3d``, trained from scratch).
        slice_context: ``slices`` only: 3 (three adjacent slices as RGB; needs ``in_channels=1``) or 1.

    Raises:
        ConfigError: unknown backbone, task or volume kind, wrong number of classes, bad ``in_channels``, a
            backbone that does not fit the volume kind.
        WeightsUnavailable, CheckpointError: see :func:`~medtransfer.models.backbones.load_backbone`.

    Examples:
        >>> model = build_model("efficientnet_lite0", ["normal", "pneumonia"])  # doctest: +SKIP
        >>> model(torch.zeros(2, 1, 64, 64)).shape  # doctest: +SKIP
        torch.Size([2, 1])
        >>> model = build_model("efficientnet_lite0", ["a", "b"], volume="slices")  # doctest: +SKIP
        >>> model(torch.zeros(2, 1, 16, 64, 64)).shape, model.head.last_attention.shape  # doctest: +SKIP
        (torch.Size([2, 1]), torch.Size([2, 16]))
    """
    spec = get_backbone(backbone)
    num_outputs = _num_outputs(task, classes)
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    check_volume_model(spec, volume, slice_context=slice_context, in_channels=in_channels)
    net = load_backbone(backbone, weights)
    # slices with three adjacent slices as RGB: the pretrained first conv stays exactly as it is
    rgb_slices = volume == "slices" and slice_context == 3
    conv = get_path(net, spec.first_conv)
    if not rgb_slices and conv.in_channels != in_channels:  # type: ignore[union-attr]
        set_path(net, spec.first_conv, adapt_input_conv(conv, in_channels))  # type: ignore[arg-type]
        how = ("summing" if in_channels == 1 else "tiling and rescaling") + (
            " RGB filters" if conv.in_channels == 3 else " its filter")  # type: ignore[union-attr]
        logger.info("%s: adapted first conv %s from %d to %d input channel(s) by %s", backbone, spec.first_conv,
                    conv.in_channels, in_channels, how)  # type: ignore[union-attr]
    net = disable_inplace_relu(net)
    kw = {"dropout": dropout, "classes": classes, "task": task}
    if volume == "slices":
        return SliceClassifier(net, spec, num_outputs, slice_context=slice_context, **kw)  # type: ignore[arg-type]
    if volume == "acs":
        convert_to_acs(net, name=backbone)
        logger.info("%s: 2D ImageNet convolutions converted to ACS 3D convolutions", backbone)
    return Classifier(net, spec, num_outputs, volume=volume, **kw)  # type: ignore[arg-type]


def _num_outputs(task: str, classes: Sequence[str]) -> int:
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
    if len(set(classes)) != len(classes) or not classes:
        raise ConfigError(f"classes must be non-empty and unique, got {list(classes)}")
    if task == "binary":
        if len(classes) != 2:
            raise ConfigError(f"a binary task needs exactly 2 classes, got {list(classes)}")
        return 1
    if task == "multiclass" and len(classes) < 2:
        raise ConfigError(f"a multiclass task needs at least 2 classes, got {list(classes)}")
    return len(classes)
