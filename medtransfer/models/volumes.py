"""Building blocks that carry 2D ImageNet weights into volumes (N, C, D, H, W).

Two ways, chosen with ``model.volume`` (the models themselves are built by
:func:`medtransfer.models.classifier.build_model`):

- ``slices`` (2.5D): the 2D backbone encodes every slice (:func:`slice_stack`, :func:`encode_in_chunks`) and
  :class:`AttentionMILHead` pools the per-slice features with gated attention (Ilse, Tomczak & Welling,
  ICML 2018), keeping the weights so that predictions can say which slices they rest on.
- ``acs``: :func:`convert_to_acs` turns the 2D network into a 3D one in place (Yang et al., "Reinventing 2D
  convolutions for 3D images", IEEE JBHI 2021): every ``nn.Conv2d`` becomes an :class:`ACSConv` that applies
  its pretrained kernel as axial (1, k, k), coronal (k, 1, k) and sagittal (k, k, 1) kernels on three parts of
  its output channels; BatchNorm, pooling and padding layers become their 3D twins with the same state.

Why ACS and not I3D inflation: docs/decisions.md. This module does not import the classifier (which imports it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import BACKBONES, BackboneSpec

logger = logging.getLogger(__name__)

#: ``model.volume`` values (the config field and the model card use the same names).
VOLUME_KINDS = ("slices", "acs", "native")
#: Slices encoded per backbone call: peak activation memory scales with this, not with N * D.
SLICE_CHUNK = 32
#: Hidden size of the attention network (Ilse et al. use 128).
ATTENTION_HIDDEN = 128

# Conv2d subclasses whose forward pads like TensorFlow's "SAME" for the input it gets (efficientnet-lite, timm).
_TF_SAME_DYNAMIC = frozenset({"Conv2dDynamicSamePadding", "Conv2dSame"})


def check_volume_model(spec: BackboneSpec, volume: str | None, *, slice_context: int = 3, in_channels: int = 1) -> None:
    """Refuse a backbone that does not fit the volume kind (``build_model`` calls it before loading weights).

    Args:
        spec: the backbone's spec.
        volume: None for images, else ``slices``, ``acs`` or ``native``.
        slice_context: ``slices`` only: 1 or 3 (3 needs ``in_channels=1``).
        in_channels: input channels of the scans.

    Raises:
        ConfigError: saying what fits instead.
    """
    three_d = [n for n, s in BACKBONES.items() if s.spatial_dims == 3]
    if volume is None:
        if spec.spatial_dims == 3:
            raise ConfigError(f"{spec.name} is a 3D network: it takes volumes (input.size with 3 entries, D H W) and "
                              "model.volume=native; for 2D images choose a 2D backbone such as efficientnet_lite0.")
        return
    if volume not in VOLUME_KINDS:
        raise ConfigError(f"unknown model.volume '{volume}'; expected one of {', '.join(VOLUME_KINDS)}")
    if volume == "native" and spec.spatial_dims != 3:
        raise ConfigError(f"model.volume=native trains a 3D network from scratch, but {spec.name} is a 2D ImageNet "
                          f"backbone. Choose model.backbone from {', '.join(three_d)}, or keep {spec.name} with "
                          "model.volume=slices or acs (they carry its ImageNet weights into 3D).")
    if volume != "native" and spec.spatial_dims == 3:
        raise ConfigError(f"model.volume={volume} reuses a 2D ImageNet backbone, but {spec.name} is a 3D network; "
                          f"use model.volume=native with it, or a 2D backbone such as efficientnet_lite0.")
    if volume == "acs" and not spec.acs:
        ok = [n for n, s in BACKBONES.items() if s.acs and s.spatial_dims == 2]
        raise ConfigError(f"{spec.name} cannot be converted to ACS 3D convolutions (its forward pass is 2D-only); use "
                          f"model.volume=slices with it, or one of {', '.join(ok)} for acs.")
    if volume == "slices":
        if slice_context not in (1, 3):
            raise ConfigError(f"model.slice_context must be 1 or 3, got {slice_context}")
        if slice_context == 3 and in_channels != 1:
            raise ConfigError(f"model.slice_context=3 stacks three adjacent slices as the RGB input, so volumes must "
                              f"have 1 channel (one CT window), got {in_channels}; use model.slice_context=1 for "
                              "several channels.")


# -- 2.5D: slices -----------------------------------------------------------------------------------------------
class AttentionMILHead(nn.Module):
    """Gated attention-MIL pooling over slices, then dropout and a linear layer.

    ``a_s = softmax_s(w^T (tanh(V h_s) * sigmoid(U h_s)))`` and ``z = sum_s a_s h_s`` (Ilse et al. 2018, gated
    attention), then ``linear(dropout(z))``.

    Args:
        in_features: F, the per-slice feature size.
        num_outputs: K.
        hidden: size of the attention network.
        dropout: dropout before the linear layer.

    Attributes:
        last_attention: the attention weights (N, S) of the last forward pass, detached (None before one);
            each row sums to 1. Predictions save them ("which slices?").
    """

    def __init__(self, in_features: int, num_outputs: int, *, hidden: int = ATTENTION_HIDDEN,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.attention_v = nn.Linear(in_features, hidden)
        self.attention_u = nn.Linear(in_features, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_outputs)
        self.last_attention: torch.Tensor | None = None

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """Attention weights (N, S) for per-slice features ``h`` (N, S, F)."""
        gated = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return torch.softmax(self.attention_w(gated).squeeze(-1), dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) from per-slice features ``h`` (N, S, F); stores ``last_attention``."""
        if h.ndim != 3:
            raise ValueError(f"the attention-MIL head takes per-slice features (N, S, F), got {tuple(h.shape)}")
        a = self.attention(h)
        self.last_attention = a.detach()
        pooled = torch.bmm(a.unsqueeze(1).to(h.dtype), h).squeeze(1)
        return self.linear(self.dropout(pooled))


def slice_stack(x: torch.Tensor, context: int) -> torch.Tensor:
    """The 2D input of every slice, as a view (N, D, C', H, W) of volumes ``x`` (N, C, D, H, W).

    ``context=1``: slice s alone (C' = C). ``context=3``: slices (s-1, s, s+1) as three channels (C' = 3; the
    volume must have one channel), the first and last slice replicating themselves at the edge.
    """
    if x.ndim != 5:
        raise ValueError(f"volumes must be (N, C, D, H, W), got shape {tuple(x.shape)}")
    if context == 1:
        return x.permute(0, 2, 1, 3, 4)
    if context != 3:
        raise ConfigError(f"slice_context must be 1 or 3, got {context}")
    if x.shape[1] != 1:
        raise ConfigError(f"slice_context=3 stacks three adjacent slices as the RGB input, so the volume needs 1 "
                          f"channel, got {x.shape[1]}; use model.slice_context=1 for multi-channel volumes.")
    padded = torch.cat([x[:, 0, :1], x[:, 0], x[:, 0, -1:]], dim=1)  # (N, D + 2, H, W), edges replicated
    return padded.unfold(1, 3, 1).permute(0, 1, 4, 2, 3)  # (N, D, 3, H, W), no copy


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise with batch statistics but leave running statistics alone.

    For the recomputation of activation checkpointing: the forward pass already updated the running statistics
    once; a second update from the same batch would count it twice (and ``num_batches_tracked`` too).
    """
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def encode_in_chunks(encode: Callable[[torch.Tensor], torch.Tensor], slices: torch.Tensor, *,
                     chunk_size: int | None, use_checkpoint: bool, bn_owner: nn.Module,
                     to_input: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``encode`` every slice of ``slices`` (N, D, C', H, W), ``chunk_size`` slices per call: features (N*D, F).

    Chunks run in slice order (volume 0's slices first), so a hook on a layer inside ``encode`` sees its
    outputs in that order, once per chunk. With ``use_checkpoint`` each chunk's activations are recomputed in
    the backward pass instead of kept (``torch.utils.checkpoint``, non-reentrant): peak memory scales with the
    chunk; the recomputation does not update ``bn_owner``'s BatchNorm running statistics a second time.

    Args:
        encode: maps a batch of 2D inputs (B, C', H, W) to features (B, F).
        slices: the view from :func:`slice_stack`.
        chunk_size: slices per call; None encodes all at once.
        use_checkpoint: recompute activations in backward (only useful when gradients flow).
        bn_owner: the module holding the BatchNorm layers that ``encode`` runs.
        to_input: applied to each chunk before ``encode`` (e.g. a change of normalisation).
    """
    n, d = slices.shape[:2]
    total = n * d
    step = total if not chunk_size else max(1, int(chunk_size))
    outs = []
    for start in range(0, total, step):
        idx = torch.arange(start, min(start + step, total), device=slices.device)
        chunk = slices[idx // d, idx % d]  # (B, C', H, W): a copy of this chunk only
        if to_input is not None:
            chunk = to_input(chunk)
        if use_checkpoint:
            outs.append(checkpoint(encode, chunk, use_reentrant=False,
                                   context_fn=lambda: (contextlib.nullcontext(), frozen_running_stats(bn_owner))))
        else:
            outs.append(encode(chunk))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def slices_to_volume_map(t: torch.Tensor, depth: int) -> torch.Tensor:
    """Per-slice maps (N*D, C, h, w), volume-major, → one map per volume (N, C, D, h, w)."""
    nd, c, h, w = t.shape
    if depth < 1 or nd % depth:
        raise ValueError(f"{nd} slice maps do not split into volumes of {depth} slices")
    return t.reshape(nd // depth, depth, c, h, w).permute(0, 2, 1, 3, 4)


# -- ACS convolutions ---------------------------------------------------------------------------------------
def _square(value: Any, what: str, where: str) -> int:
    """One int from an int or a tuple of equal ints (ACS applies the same kernel on every plane)."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(set(vals)) != 1:
        raise ConfigError(f"{where}: {what}={vals} differs between height and width; ACS conversion needs square "
                          "kernels, strides, paddings and dilations. Use model.volume=slices for this backbone.")
    return int(vals[0])


def _split3(n: int) -> tuple[int, int, int]:
    """n split in three (axial, coronal, sagittal) parts; the remainder goes to axial, then coronal (as acsconv)."""
    base, rest = divmod(n, 3)
    return base + (rest >= 1), base + (rest >= 2), base


class ACSConv(nn.Module):
    """A 2D convolution's pretrained kernel applied to volumes as axial, coronal and sagittal convolutions.

    The output channels (for grouped and depthwise convolutions: the groups) are split in three parts; part 1
    uses the 2D kernel (k, k) as a (1, k, k) kernel (axial: in the H-W plane, slice by slice), part 2 as
    (k, 1, k) (coronal: D-W), part 3 as (k, k, 1) (sagittal: D-H). The weights are the 2D conv's own
    ``Parameter`` (same shape, no rescaling), so the parameter count and a checkpoint's tensors are those of
    the 2D network; stride, padding and dilation apply on all three axes. A part's single tap along its thin
    axis is the centre tap of a k-kernel, so the three parts' outputs have exactly the shape a full
    (k, k, k) convolution with the same padding would give.

    Args:
        conv: the 2D convolution (``nn.Conv2d`` or a subclass: TF-"same" padding, dynamic or static, is
            computed per axis in 3D).
        name: where it sits in the model (for error messages).

    Raises:
        ConfigError: non-square kernel/stride/padding/dilation, a padding mode other than zeros, or a Conv2d
            subclass whose forward does something this class does not know.
    """

    def __init__(self, conv: nn.Conv2d, name: str = "conv") -> None:
        super().__init__()
        kind = type(conv).__name__
        if conv.padding_mode != "zeros":
            raise ConfigError(f"{name}: padding_mode={conv.padding_mode!r} is not supported by ACS conversion")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = _square(conv.kernel_size, "kernel_size", name)
        self.stride = _square(conv.stride, "stride", name)
        self.dilation = _square(conv.dilation, "dilation", name)
        self.weight = conv.weight  # the same Parameter: (O, C / groups, k, k)
        self.bias = conv.bias
        span = self.dilation * (self.kernel_size - 1)
        #: (before, after) zero padding per axis (D, H, W); None: TF "same", computed from each input's size
        self.pads: tuple[tuple[int, int], ...] | None
        if kind in _TF_SAME_DYNAMIC:
            self.pads = None
        elif isinstance(conv.padding, str):  # "same" / "valid" (PyTorch pads "same" as floor, ceil)
            self.pads = ((span // 2, span - span // 2),) * 3 if conv.padding == "same" else ((0, 0),) * 3
        else:
            p = _square(conv.padding, "padding", name)
            self.pads = ((p, p),) * 3
        static = getattr(conv, "static_padding", None)
        if isinstance(static, nn.ZeroPad2d):  # efficientnet-lite's Conv2dStaticSamePadding: (left, right, top, bottom)
            left, right, top, bottom = static.padding
            (a0, a1), (b0, b1), (c0, c1) = self.pads or ((0, 0),) * 3
            self.pads = ((a0 + top, a1 + bottom), (b0 + top, b1 + bottom), (c0 + left, c1 + right))  # D as H
        elif static is not None and type(static).__name__ != "Identity":
            raise ConfigError(f"{name}: unknown static padding {type(static).__name__} in {kind}")
        elif static is None and kind not in _TF_SAME_DYNAMIC and type(conv).forward is not nn.Conv2d.forward:
            raise ConfigError(f"{name}: {kind} overrides Conv2d.forward in a way ACS conversion does not know; "
                              "use model.volume=slices for this backbone.")
        per_group_out, per_group_in = self.out_channels // self.groups, self.in_channels // self.groups
        #: per part (axial, coronal, sagittal): output channels [o0, o1), input channels [i0, i1), groups
        self.parts: list[tuple[int, int, int, int, int]] = []
        o0 = i0 = 0
        if self.groups == 1:
            for size in _split3(self.out_channels):
                self.parts.append((o0, o0 + size, 0, self.in_channels, 1))
                o0 += size
        else:
            for g in _split3(self.groups):
                self.parts.append((o0, o0 + g * per_group_out, i0, i0 + g * per_group_in, g))
                o0, i0 = o0 + g * per_group_out, i0 + g * per_group_in

    def _padding(self, size: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        if self.pads is not None:
            return self.pads
        k, s, d = self.kernel_size, self.stride, self.dilation
        out = []
        for length in size:  # TF "SAME": output ceil(L / s), the odd pixel of padding after
            total = max((math.ceil(length / s) - 1) * s + (k - 1) * d + 1 - length, 0)
            out.append((total // 2, total - total // 2))
        return tuple(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes (N, C, D, H, W) → (N, O, D', H', W')."""
        if x.ndim != 5:
            raise ValueError(f"an ACS convolution takes volumes (N, C, D, H, W), got shape {tuple(x.shape)}")
        (d0, d1), (h0, h1), (w0, w1) = self._padding(tuple(x.shape[2:]))
        if d0 or d1 or h0 or h1 or w0 or w1:
            x = F.pad(x, (w0, w1, h0, h1, d0, d1))
        k, s, dil = self.kernel_size, self.stride, self.dilation
        if k == 1:  # a 1x1 kernel is the same on every plane: one 1x1x1 convolution
            return F.conv3d(x, self.weight.unsqueeze(2), self.bias, s, 0, dil, self.groups)
        n_out = [(length - dil * (k - 1) - 1) // s + 1 for length in x.shape[2:]]
        centre = (k - 1) // 2
        outs = []
        for axis, (o0, o1, i0, i1, groups) in enumerate(self.parts):
            if o1 == o0:
                continue
            part = x if self.groups == 1 else x[:, i0:i1]
            # the thin axis: the centre tap of a k-kernel reads these positions of the padded input
            part = part.narrow(2 + axis, centre * dil, (n_out[axis] - 1) * s + 1)
            bias = None if self.bias is None else self.bias[o0:o1]
            outs.append(F.conv3d(part, self.weight[o0:o1].unsqueeze(2 + axis), bias, s, 0, dil, groups))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        split = [p[1] - p[0] for p in self.parts]
        pad = "tf_same" if self.pads is None else self.pads
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={pad}, groups={self.groups}, axial/coronal/sagittal={split}")


def _one(value: Any, what: str, where: str) -> Any:
    return value if value is None or isinstance(value, (bool, float)) else _square(value, what, where)


def _batchnorm3d(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    new = nn.BatchNorm3d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
    for key, param in bn._parameters.items():  # the same Parameters and buffers: state kept, nothing copied
        new._parameters[key] = param
    for key, buf in bn._buffers.items():
        new._buffers[key] = buf
    return new.train(bn.training)


def _convert_layer(m: nn.Module, name: str) -> nn.Module | None:
    """The 3D twin of a 2D layer (sharing its parameters), or None when ``m`` is not a 2D layer."""
    kind = type(m)
    if isinstance(m, nn.Conv2d):
        return ACSConv(m, name)
    exact = {nn.BatchNorm2d: nn.BatchNorm2d.forward, nn.MaxPool2d: nn.MaxPool2d.forward,
             nn.AvgPool2d: nn.AvgPool2d.forward, nn.AdaptiveAvgPool2d: nn.AdaptiveAvgPool2d.forward,
             nn.AdaptiveMaxPool2d: nn.AdaptiveMaxPool2d.forward, nn.ZeroPad2d: nn.ZeroPad2d.forward,
             nn.Dropout2d: nn.Dropout2d.forward}
    base = next((b for b in exact if isinstance(m, b)), None)
    if base is None:
        return None
    if kind.forward is not exact[base]:
        raise ConfigError(f"{name}: {kind.__name__} overrides {base.__name__}.forward; ACS conversion does not "
                          "know what it does. Use model.volume=slices for this backbone.")
    if base is nn.BatchNorm2d:
        return _batchnorm3d(m)  # type: ignore[arg-type]
    if base is nn.MaxPool2d:
        return nn.MaxPool3d(_one(m.kernel_size, "kernel_size", name), _one(m.stride, "stride", name),
                            _one(m.padding, "padding", name), _one(m.dilation, "dilation", name),
                            return_indices=m.return_indices, ceil_mode=m.ceil_mode)
    if base is nn.AvgPool2d:
        return nn.AvgPool3d(_one(m.kernel_size, "kernel_size", name), _one(m.stride, "stride", name),
                            _one(m.padding, "padding", name), ceil_mode=m.ceil_mode,
                            count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)
    if base is nn.AdaptiveAvgPool2d:
        return nn.AdaptiveAvgPool3d(_one(m.output_size, "output_size", name))
    if base is nn.AdaptiveMaxPool2d:
        return nn.AdaptiveMaxPool3d(_one(m.output_size, "output_size", name), return_indices=m.return_indices)
    if base is nn.ZeroPad2d:
        left, right, top, bottom = m.padding
        return nn.ZeroPad3d((left, right, top, bottom, top, bottom))  # depth padded as height
    return nn.Dropout3d(m.p, inplace=m.inplace)


@functools.cache
def _mbconv_nd() -> type[nn.Module] | None:
    """efficientnet-lite's MBConvBlock with a forward that works on any number of spatial dims, or None."""
    try:
        from efficientnet_lite_pytorch.model import MBConvBlock
    except ImportError:  # pragma: no cover - a hard dependency
        return None

    def forward(self: Any, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        # MBConvBlock.forward with its two 2D-only functional calls made dimension-free: the squeeze-excite
        # pooling (F.adaptive_avg_pool2d) and drop-connect's (N, 1, 1, 1) mask.
        x = inputs
        if self._block_args.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            squeezed = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
            x = torch.sigmoid(self._se_expand(self._swish(self._se_reduce(squeezed)))) * x
        x = self._bn2(self._project_conv(x))
        args = self._block_args
        if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            if drop_connect_rate and self.training:
                keep = 1 - drop_connect_rate
                mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                                                     device=x.device))
                x = x / keep * mask
            x = x + inputs
        return x

    return type("MBConvBlockNd", (MBConvBlock,), {"forward": forward, "__module__": __name__})


def convert_to_acs(model: nn.Module, *, name: str = "model") -> nn.Module:
    """Turn a 2D convolutional network into a 3D one in place, keeping every pretrained weight (ACS).

    Every ``nn.Conv2d`` (subclasses included) becomes an :class:`ACSConv` over the same Parameter;
    ``BatchNorm2d`` → ``BatchNorm3d`` with the same parameters, running statistics and momentum; max/avg/
    adaptive pooling, ``ZeroPad2d`` and ``Dropout2d`` → their 3D forms. efficientnet-lite's blocks get a forward
    without its 2D-only functional calls. The network then takes volumes (N, C, D, H, W).

    Raises:
        ConfigError: a layer that cannot be converted (names it), or a 2D layer left over (e.g. ConvNeXt's
            LayerNorm2d): such backbones are marked ``acs=False`` in the backbone table.

    Examples:
        >>> net = convert_to_acs(load_backbone("efficientnet_lite0"))  # doctest: +SKIP
        >>> net.extract_features(torch.zeros(1, 3, 16, 32, 32)).shape  # doctest: +SKIP
        torch.Size([1, 1280, 1, 1, 1])
    """
    block_nd = _mbconv_nd()
    done: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            where = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in done:
                setattr(parent, child_name, done[id(child)])
                continue
            new = _convert_layer(child, where)
            if new is None:
                if block_nd is not None and type(child) is block_nd.__mro__[1]:
                    child.__class__ = block_nd
                visit(child, where)
                new = child
            done[id(child)] = new
            setattr(parent, child_name, new)

    visit(model, "")
    left = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().endswith("2d")})
    if left:
        raise ConfigError(f"{name}: ACS conversion left 2D layers ({', '.join(left)}); this backbone cannot run "
                          "on volumes as 3D convolutions. Use model.volume=slices, or another backbone.")
    return model
