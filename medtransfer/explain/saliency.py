"""``explain``: where a model looks: Grad-CAM, Integrated Gradients and gradients with Captum; occlusion.

Every method attributes the model's **logit** for the target output (the pre-sigmoid/softmax score, as in
the Grad-CAM paper), and returns maps at input resolution, scaled per image to [0, 1]:

- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) on ``model.cam_layer()``; positive evidence only (the
  paper's ReLU). Captum's ``LayerGradCam(relu_attributions=False)`` is its default, so we take the signed
  coarse map, keep it as ``raw`` (upsampled), and apply the ReLU ourselves *before* the bilinear upsampling,
  as the paper does. ViT tokens (class and register tokens dropped) and channels-last maps (Swin) are
  reshaped to a map with ``model.cam_reshape()``, activations and gradients alike, then weighted the same way.
- ``integrated_gradients``: Integrated Gradients (Sundararajan et al. 2017), ``n_steps`` (default 32) Gauss-
  Legendre steps evaluated ``internal_batch_size`` at a time so memory stays bounded; optional SmoothGrad
  (NoiseTunnel) with noise std = 15% of the batch's value range (Smilkov et al.). Maps: |attribution|.
- ``occlusion``: a window of 1/8 of the image side (16 px at 128 px, 28 px at 224 px) is replaced by the
  baseline and the logit drop is recorded; a pixel's raw value is the mean drop over the evaluated windows
  that cover it, the map its positive part (evidence *for* the target). Coarse to fine, so that the cost per
  image is bounded whatever the image size: the window is first slid at a stride of one window over the
  whole image (8 x 8 = 64 occluded copies); then, around the 1/8 of those windows with the largest drop
  (8 windows), the windows at half-window stride are added (at most 64 more, fewer when the top windows
  are neighbours; about 40 on the demo's cases). Every window has the same size, so coarse and refined
  regions are on one scale: the refined regions (where the evidence is) have the resolution of a full
  half-stride scan (15 x 15 = 225 copies), the rest that of the window. ``occlusion_refine=1`` is the full
  half-stride scan (identical to Captum's ``Occlusion`` with stride = window / 2), ``occlusion_refine=0``
  the coarse pass alone. The last window of a row or column is aligned with the image edge, so every pixel
  is covered. Occluded copies are evaluated ``internal_batch_size`` per forward pass, across images, with
  no gradients.
- ``saliency``: vanilla gradients (Simonyan et al. 2014), absolute value (Captum's ``abs=True``).

The default baseline for IG and occlusion is 0 in the *normalised* input space, i.e. a flat image at the
normalisation mean (mid grey). A black image is the usual default in natural images, but black is
informative in radiographs (air, collimation), so a neutral grey is a less biased reference.

Multi-channel inputs are summed over channels (signed for ``raw``; ``maps`` then take ReLU or abs).

**Volumes** (images (N, C, D, H, W), maps (N, K, D, H, W)) go through the same methods:

- ``gradcam`` on a 3D CAM layer (``acs``, ``native``: output (N, C, d, h, w)) is 3D Grad-CAM: channel weights
  are the mean gradient over (d, h, w), ReLU, then trilinear upsampling. For ``slices`` models (a 2D backbone
  encodes every slice; its CAM layer gives (N*D, C, h, w) and ``model.cam_reshape()`` maps that to
  (N, C, D, h, w)) each slice gets its own 2D Grad-CAM: channel weights are the mean gradient over that
  slice's (h, w). Each slice has its own feature path into the attention pooling, so per-slice weights
  keep what the model does with each slice (a slice with little attention gets small gradients, hence a weak
  map), whereas one weight per channel for the whole volume would mix slices the model treats differently.
  The rule is read from the shapes: a CAM layer whose output batch is not the volume batch sees slices.
  Volumes are processed one per backward pass (memory stays that of one volume).
- ``occlusion`` slides a 3D window of 1/8 of each axis, coarse to fine as in 2D: 8 x 8 x 8 = 512 occluded
  copies per volume at a stride of one window (when each side is a multiple of 16; up to 12 per axis for
  small sides whose 1/8 is odd), then the windows at half-window stride around the 8 coarse windows with
  the largest drop (``occlusion_refine`` 1/64 of the coarse windows by default for volumes, 1/8 in 2D:
  8 windows either way), at most 8 x 26 = 208 more; so at most 2 + 512 + 208 = 722 forward passes of a
  volume per map. ``slices`` models get the same 3D windows (not whole slices): one method for every volume
  model, and an in-plane location that whole-slice occlusion cannot give (which slices matter is what the
  attention weights already say, ``SaliencyMaps.attention``). Cost: for ``slices`` models an occluded copy
  re-encodes only the slices whose 2D input the window touches (its depth plus one neighbour each side with
  three-slice context), the other slices' features are reused and the head runs on the spliced stack: the same
  logit as a full forward pass in eval mode, at about (wd + 2) / D of the cost (13 s for a 32 x 128 x 128 map
  on 2 CPU cores, against about 70 s re-encoding every slice).
- ``integrated_gradients`` and ``saliency`` need nothing volume-specific (Captum works on any shape).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.inference import forward_batches

logger = logging.getLogger(__name__)

Method = Literal["gradcam", "integrated_gradients", "occlusion", "saliency"]
METHODS: tuple[str, ...] = ("gradcam", "integrated_gradients", "occlusion", "saliency")
#: Occlusion window side as a fraction of the image side.
OCCLUSION_WINDOW = 1 / 8
#: Share of the coarse occlusion windows (those with the largest logit drop) refined at half-window stride.
OCCLUSION_REFINE = 1 / 8
#: The same for volumes: 8 of the 8 x 8 x 8 coarse windows, as 1/8 is 8 of 8 x 8 in 2D.
OCCLUSION_REFINE_3D = 1 / 64


@dataclass
class SaliencyMaps:
    """Saliency maps for N images and K targets.

    Attributes:
        maps: float tensor (N, K, H, W), or (N, K, D, H, W) for volumes, in [0, 1], scaled per image and
            target (max = 1 unless all zero).
        raw: float tensor of the same shape, the unscaled attribution summed over input channels (signed for
            Grad-CAM, IG and occlusion; |gradient| for ``saliency``).
        method: the method name.
        targets: int tensor (N, K), the model output index each map explains.
        scores: float tensor (N, K) in [0, 1], the model's probability for each target (calibrated with
            the card's temperature when a Run is given, as in ``predictions.csv``).
        attention: float tensor (N, S) or None: a ``slices`` model's attention weight per slice (S = D),
            read after the forward pass (see :func:`slice_attention`); None for other models.
    """

    maps: torch.Tensor
    raw: torch.Tensor
    method: str
    targets: torch.Tensor
    scores: torch.Tensor
    attention: torch.Tensor | None = None


def explain(
    run_or_model: Any,
    images: torch.Tensor,
    *,
    method: Method | str = "gradcam",
    target: int | Sequence[int] | None = None,
    internal_batch_size: int = 8,
    smoothgrad: bool = False,
    baseline: float | torch.Tensor | None = None,
    n_steps: int = 32,
    nt_samples: int = 8,
    occlusion_refine: float | None = None,
) -> SaliencyMaps:
    """Saliency maps for ``images``.

    Args:
        run_or_model: a :class:`~medtransfer.training.run.Run` or a model (a :class:`Classifier`; any
            ``nn.Module`` mapping images to logits (N, K) works for the gradient methods and occlusion).
        images: float tensor (N, C, H, W), or (N, C, D, H, W) for volumes, preprocessed with ``card.input``
            (normalised).
        method: ``gradcam``, ``integrated_gradients``, ``occlusion`` or ``saliency``.
        target: model output index, or several (one map per index, e.g. multi-label classes). None: binary
            the single output (index 0, the positive class); otherwise each image's highest-scoring output.
        internal_batch_size: images evaluated per forward pass for IG (n_steps x N in total) and occluded
            copies per forward pass for occlusion.
        smoothgrad: average IG / saliency over ``nt_samples`` noisy copies (NoiseTunnel, seeded).
        baseline: IG / occlusion reference, a float or a tensor broadcastable to ``images`` (normalised
            space); None = 0 (see the module docstring).
        n_steps: IG integration steps.
        nt_samples: SmoothGrad samples.
        occlusion_refine: share of the coarse occlusion windows refined at half-window stride, in [0, 1]
            (see the module docstring; 1 = the full half-stride scan, 0 = the coarse pass alone); None:
            ``OCCLUSION_REFINE`` (1/8) for images, ``OCCLUSION_REFINE_3D`` (1/64) for volumes.

    Returns:
        :class:`SaliencyMaps` with maps (N, K, H, W) or (N, K, D, H, W), on the CPU (the images go to the
        model's device).

    The model is put in eval mode and its training flag and parameters' ``requires_grad`` are restored
    afterwards; its outputs are unchanged (gradients are taken with ``torch.autograd.grad``, never stored).
    Activation modules are switched to ``inplace=False`` (permanently; this never changes outputs).

    Examples:
        >>> sm = explain(run, x, method="gradcam")  # doctest: +SKIP
        >>> sm.maps.shape  # doctest: +SKIP
        torch.Size([4, 1, 224, 224])
    """
    model, task = model_and_task(run_or_model)
    if method not in METHODS:
        raise ConfigError(f"unknown saliency method '{method}'; expected one of {', '.join(METHODS)}")
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (N, C, H, W) or, for volumes, (N, C, D, H, W); got shape "
                         f"{tuple(images.shape)}")
    if occlusion_refine is None:
        occlusion_refine = OCCLUSION_REFINE if images.ndim == 4 else OCCLUSION_REFINE_3D
    if not 0 <= occlusion_refine <= 1:
        raise ValueError(f"occlusion_refine must be in [0, 1], got {occlusion_refine}")
    x = images.detach().float().to(model_device(model))
    with prepared(model):
        logits, _ = forward_batches(model, [(x, None)], device=x.device)
        attention = slice_attention(model, len(x)) if x.ndim == 5 else None
        targets = resolve_targets(logits.to(x.device), target, task)
        raws = [_attribute(model, x, targets[:, k], method, internal_batch_size=internal_batch_size,
                           smoothgrad=smoothgrad, baseline=baseline, n_steps=n_steps, nt_samples=nt_samples,
                           occlusion_refine=occlusion_refine)
                for k in range(targets.shape[1])]
    raw = torch.stack([r[0] for r in raws], dim=1).cpu()
    maps = torch.stack([r[1] for r in raws], dim=1).cpu()
    temperature = getattr(getattr(run_or_model, "card", None), "temperature", None) or 1.0
    scores = probabilities(logits / temperature, task).cpu().gather(1, targets)
    return SaliencyMaps(maps=maps, raw=raw, method=str(method), targets=targets, scores=scores, attention=attention)


def slice_attention(model: nn.Module, n: int) -> torch.Tensor | None:
    """A ``slices`` model's attention weights (n, S) from its last forward pass, on the CPU; None if it has none.

    Read from ``model.head.last_attention`` (or ``model.last_attention``); anything that is not a tensor of
    ``n`` rows (another model kind, a stale value from a pass over another batch) gives None.
    """
    for owner in (getattr(model, "head", None), model):
        att = getattr(owner, "last_attention", None) if owner is not None else None
        if isinstance(att, torch.Tensor) and att.ndim >= 2 and att.shape[0] == n:
            return att.detach().float().reshape(n, -1).cpu()
    return None


def model_and_task(run_or_model: Any) -> tuple[nn.Module, str]:
    """The model of a Run (or the model itself) and its task ("" when unknown: a plain module)."""
    model = getattr(run_or_model, "model", run_or_model)
    card = getattr(run_or_model, "card", None)
    task = card.task if card is not None else getattr(model, "task", "")
    return model, str(task or "")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_targets(logits: torch.Tensor, target: int | Sequence[int] | None, task: str) -> torch.Tensor:
    """Output indices (N, K) to explain; see :func:`explain` for the rule when ``target`` is None."""
    n, k_out = logits.shape
    if target is None:
        if k_out == 1 or task == "binary":
            return torch.zeros(n, 1, dtype=torch.long)
        return logits.argmax(dim=1, keepdim=True).cpu()
    idx = [int(target)] if isinstance(target, int) else [int(t) for t in target]
    bad = [t for t in idx if not 0 <= t < k_out]
    if bad or not idx:
        raise ValueError(f"target {list(target) if not isinstance(target, int) else target} out of range: "
                         f"the model has {k_out} output(s) (binary: 0 = the positive class)")
    return torch.tensor(idx, dtype=torch.long).expand(n, len(idx)).clone()


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities (N, K): softmax for multi-class, sigmoid otherwise."""
    if task == "multiclass" or (not task and logits.shape[1] > 1):
        return torch.softmax(logits.float(), dim=1)
    return torch.sigmoid(logits.float())


@contextlib.contextmanager
def prepared(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; restore the training flag and every parameter's ``requires_grad`` after.

    Gradients are taken with respect to the input (Captum sets ``requires_grad`` on it), so frozen
    parameters need not change; the restore guards against any attribution code that toggles them.
    """
    from medtransfer.models.classifier import disable_inplace_relu

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    disable_inplace_relu(model)  # never changes outputs; Captum's hooks need outputs not modified in place
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _attribute(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: str, *,
               internal_batch_size: int, smoothgrad: bool, baseline: Any, n_steps: int,
               nt_samples: int, occlusion_refine: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, scaled) maps (N, *spatial) for one target per image."""
    tlist = target.tolist()
    if method == "gradcam":
        # (N, 1, h, w) or (N, 1, d, h, w), signed; volumes one at a time (memory of one volume's backward)
        coarse = _gradcam(model, x, tlist) if x.ndim == 4 else torch.cat(
            [_gradcam_volume(model, x[i:i + 1], tlist[i:i + 1]) for i in range(len(x))])
        raw = _upsample(coarse, x.shape[2:])
        return raw[:, 0], scale_maps(_upsample(F.relu(coarse), x.shape[2:])[:, 0])
    base = torch.as_tensor(0.0 if baseline is None else baseline, dtype=x.dtype, device=x.device)
    if method == "occlusion":
        # A window covers every channel, so each channel carries the pixel's mean drop: summed over channels
        # (as for the other methods, and as Captum's per-channel attribution summed) that is C x the drop.
        raw = _occlusion(model, x, target, base, batch_size=internal_batch_size, refine=occlusion_refine)
        raw = raw * x.shape[1]
        return raw, scale_maps(F.relu(raw))
    attr = _gradient_method(model, x, tlist, method, base, internal_batch_size=internal_batch_size,
                            smoothgrad=smoothgrad, n_steps=n_steps, nt_samples=nt_samples)
    return attr.sum(dim=1), scale_maps(attr.abs().sum(dim=1))


def _gradcam(model: nn.Module, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    from captum.attr import LayerGradCam

    if not hasattr(model, "cam_layer"):
        raise ValueError(f"gradcam needs a model with cam_layer() (a medtransfer Classifier), got "
                         f"{type(model).__name__}; use method='integrated_gradients' or 'saliency'")
    layer = model.cam_layer()  # type: ignore[operator]
    reshape = model.cam_reshape() if hasattr(model, "cam_reshape") else None  # type: ignore[operator]
    if reshape is None:
        return LayerGradCam(model, layer).attribute(x, target=target).detach()
    # Token layers (ViT: any number of class/register tokens) and channels-last maps: the layer's output and its
    # gradient are both mapped to (N, C, h, w) by cam_reshape() (a re-indexing, so gradients map exactly as
    # activations); then Captum's LayerGradCam formula: channel weights = mean gradient over (h, w).
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            selected = logits.gather(1, torch.as_tensor(target, device=logits.device)[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, seen[-1])
    finally:
        handle.remove()
    act, grad = reshape(seen[-1].detach()), reshape(grad)
    return (grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True).detach()


def _gradcam_volume(model: nn.Module, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Grad-CAM for volumes x (N, C, D, H, W): coarse signed map (N, 1, d, h, w); see the module docstring.

    Computed here rather than with Captum's ``LayerGradCam`` because a ``slices`` model's CAM layer sees the
    slices as a batch (N*D, C, h, w): activations and gradients are both mapped to (N, C, D, h, w) with
    ``cam_reshape()`` (a re-indexing, so it maps gradients exactly as activations), and the channel weights
    are averaged per slice. For a 3D CAM layer this is exactly Captum's computation.
    """
    if not hasattr(model, "cam_layer"):
        raise ValueError(f"gradcam needs a model with cam_layer() (a medtransfer volume model), got "
                         f"{type(model).__name__}; use method='integrated_gradients', 'saliency' or 'occlusion'")
    layer = model.cam_layer()  # type: ignore[operator]
    reshape = model.cam_reshape() if hasattr(model, "cam_reshape") else None  # type: ignore[operator]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            selected = logits.gather(1, torch.as_tensor(target, device=logits.device)[:, None]).sum()
            # a slices model may encode its slices in chunks: the layer then runs once per chunk, in slice order
            grads = torch.autograd.grad(selected, seen, allow_unused=True)
    finally:
        handle.remove()
    act = torch.cat(seen) if len(seen) > 1 else seen[0]
    grad = torch.cat([torch.zeros_like(a) if g is None else g for a, g in zip(seen, grads, strict=True)])
    per_slice = act.shape[0] != x.shape[0]  # the layer sees slices as a batch: a slices model
    if reshape is not None:
        act, grad = reshape(act.detach()), reshape(grad)
    if act.ndim != 5 or act.shape[0] != x.shape[0]:
        raise ValueError(f"gradcam on volumes needs a CAM layer map (N, C, d, h, w) (after cam_reshape()), got "
                         f"{tuple(act.shape)} for input {tuple(x.shape)}")
    weights = grad.mean(dim=(3, 4) if per_slice else (2, 3, 4), keepdim=True)
    return (weights * act.detach()).sum(dim=1, keepdim=True).detach()


def _upsample(coarse: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    from captum.attr import LayerAttribution

    mode = "bilinear" if coarse.ndim == 4 else "trilinear"
    return LayerAttribution.interpolate(coarse, tuple(size), interpolate_mode=mode)


def occlusion_starts(length: int, window: int) -> tuple[list[int], list[int]]:
    """Window start positions along one axis: ``(fine, coarse)``, coarse a subset of fine.

    Fine: stride ``window // 2``; coarse: every second fine position, i.e. a stride of about one window (the
    fine positions themselves when the window is 1 px). The last position of each is ``length - window``,
    so the windows cover every pixel.
    """
    if not 1 <= window <= length:
        raise ValueError(f"occlusion window {window} does not fit an image side of {length}")
    step = max(1, window // 2)
    fine = list(range(0, length - window + 1, step))
    if fine[-1] != length - window:
        fine.append(length - window)
    coarse = fine[::2] if 2 * step <= window else list(fine)
    if coarse[-1] != fine[-1]:
        coarse.append(fine[-1])
    return fine, coarse


def occlusion_window(size: Sequence[int]) -> tuple[int, ...]:
    """The occlusion window for an image of ``size`` (H, W) or a volume (D, H, W): OCCLUSION_WINDOW of each side."""
    return tuple(max(1, round(s * OCCLUSION_WINDOW)) for s in size)


def _occlusion(model: nn.Module, x: torch.Tensor, target: torch.Tensor, base: torch.Tensor, *,
               batch_size: int, refine: float) -> torch.Tensor:
    """Coarse-to-fine occlusion (module docstring): signed mean logit drop (N, *spatial), on the CPU.

    Windows are ``(image, *start)`` tuples, enumerated in raster order (last axis fastest) for 2D and 3D alike.
    """
    n, size = x.shape[0], tuple(x.shape[2:])
    win = occlusion_window(size)
    axes = [occlusion_starts(length, w) for length, w in zip(size, win, strict=True)]
    fine, coarse = [a[0] for a in axes], [a[1] for a in axes]
    fill = base.expand_as(x)
    tgt = target.cpu()
    start, _ = forward_batches(model, [(x, None)], device=x.device)
    reference = start.gather(1, tgt[:, None])[:, 0]
    grid = [(i, *pos) for i in range(n) for pos in itertools.product(*coarse)]
    drops = _window_drops(model, x, fill, grid, win, tgt, reference, batch_size)
    n_coarse = math.prod(len(c) for c in coarse)
    k = min(n_coarse, math.ceil(refine * n_coarse))
    extra = _refined_windows(drops.view(n, n_coarse), fine, coarse, win, k) if k > 0 else []
    if extra:
        grid += extra
        drops = torch.cat([drops, _window_drops(model, x, fill, extra, win, tgt, reference, batch_size)])
    total = torch.zeros(n, *size)
    count = torch.zeros(n, *size)
    for (i, *pos), d in zip(grid, drops.tolist(), strict=True):
        region = (i, *(slice(p, p + w) for p, w in zip(pos, win, strict=True)))
        total[region] += d
        count[region] += 1
    return total / count


def _refined_windows(drops: torch.Tensor, fine: list[list[int]], coarse: list[list[int]], win: tuple[int, ...],
                     k: int) -> list[tuple[int, ...]]:
    """Fine windows (not already coarse) that overlap one of each image's ``k`` top coarse windows.

    ``drops``: (N, coarse windows) in raster order; ties go to the first window in raster order.
    """
    dims = len(fine)
    fine_t = [torch.tensor(f) for f in fine]
    coarse_t = [torch.tensor(c) for c in coarse]

    def along(a: int, t: torch.Tensor) -> torch.Tensor:  # (k, len) -> broadcastable over the other fine axes
        return t.view(t.shape[0], *[t.shape[1] if b == a else 1 for b in range(dims)])

    done = torch.ones(*[len(f) for f in fine], dtype=torch.bool)
    for a in range(dims):
        done = done & along(a, torch.isin(fine_t[a], coarse_t[a])[None])[0]
    extra: list[tuple[int, ...]] = []
    for i in range(len(drops)):
        top = torch.argsort(-drops[i], stable=True)[:k]
        near = torch.ones(len(top), *[len(f) for f in fine], dtype=torch.bool)
        for a, idx in enumerate(torch.unravel_index(top, tuple(len(c) for c in coarse))):
            near = near & along(a, (fine_t[a][None, :] - coarse_t[a][idx][:, None]).abs() < win[a])
        add = near.any(dim=0) & ~done
        extra += [(i, *(fine[a][j] for a, j in enumerate(row))) for row in add.nonzero().tolist()]
    return extra


def _window_drops(model: nn.Module, x: torch.Tensor, fill: torch.Tensor, windows: list[tuple[int, ...]],
                  win: tuple[int, ...], target: torch.Tensor, reference: torch.Tensor,
                  batch_size: int) -> torch.Tensor:
    """Logit drop (M,) for each (image, *start) window replaced by ``fill``; batch_size copies a pass."""
    if x.ndim == 5 and callable(getattr(model, "encode_slices", None)):
        return _slice_window_drops(model, x, fill, windows, win, target, reference, batch_size)

    def batches() -> Iterator[tuple[torch.Tensor, None]]:
        for s in range(0, len(windows), max(1, batch_size)):
            part = windows[s:s + max(1, batch_size)]
            xb = x[[w[0] for w in part]].clone()
            for j, (i, *pos) in enumerate(part):
                region = tuple(slice(p, p + w) for p, w in zip(pos, win, strict=True))
                xb[(j, slice(None), *region)] = fill[(i, slice(None), *region)]
            yield xb, None

    logits, _ = forward_batches(model, batches(), device=x.device)
    idx = torch.tensor([w[0] for w in windows], dtype=torch.long)
    return reference[idx] - logits.gather(1, target[idx][:, None])[:, 0]


def _slice_window_drops(model: nn.Module, x: torch.Tensor, fill: torch.Tensor, windows: list[tuple[int, ...]],
                        win: tuple[int, ...], target: torch.Tensor, reference: torch.Tensor,
                        batch_size: int) -> torch.Tensor:
    """:func:`_window_drops` for a ``slices`` model: re-encode only the slices whose 2D input a window touches.

    A window over slices [d, d + wd) changes the 2D inputs of slices [d - c, d + wd + c) (c = 1 with three
    adjacent slices as RGB, 0 otherwise); every other slice's features are those of the unoccluded volume. In
    eval mode the backbone encodes slices independently, so the head on the spliced features gives the same
    logit as a forward pass of the whole occluded volume (tested), at about (wd + 2c) / D of the cost:
    6 of 32 slices with the default window. ``batch_size`` slices are encoded per backbone call.
    """
    dev_ = x.device
    depth = x.shape[2]
    reach = (int(getattr(model, "slice_context", 1)) - 1) // 2
    with torch.no_grad():
        base_feats = model.features(x).float()  # (N, D, F)
    step = max(1, batch_size)
    out: list[torch.Tensor] = []
    pending: list[tuple[int, int, int]] = []  # (image, first, last) of each copy in this group
    inputs: list[torch.Tensor] = []

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            stacked = torch.cat(inputs)
            enc = torch.cat([model.encode_slices(stacked[s:s + step]).float() for s in range(0, len(stacked), step)])
            feats = base_feats[[i for i, _, _ in pending]].clone()
            at = 0
            for j, (_, lo, hi) in enumerate(pending):
                feats[j, lo:hi] = enc[at:at + hi - lo]
                at += hi - lo
            out.append(model.head(feats.to(base_feats.dtype)).float().cpu())
        pending.clear()
        inputs.clear()

    n_slices = 0
    for i, *pos in windows:
        region = tuple(slice(p, p + w) for p, w in zip(pos, win, strict=True))
        copy = x[i:i + 1].clone()
        copy[(0, slice(None), *region)] = fill[(i, slice(None), *region)]
        lo, hi = max(0, pos[0] - reach), min(depth, pos[0] + win[0] + reach)
        inputs.append(model.slice_inputs(copy)[0, lo:hi].to(dev_))
        pending.append((i, lo, hi))
        n_slices += hi - lo
        if n_slices >= step * 4:
            flush()
            n_slices = 0
    flush()
    logits = torch.cat(out)
    idx = torch.tensor([w[0] for w in windows], dtype=torch.long)
    return reference[idx] - logits.gather(1, target[idx][:, None])[:, 0]


def _gradient_method(model: nn.Module, x: torch.Tensor, target: list[int], method: str, base: torch.Tensor, *,
                     internal_batch_size: int, smoothgrad: bool, n_steps: int, nt_samples: int) -> torch.Tensor:
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    is_ig = method == "integrated_gradients"
    algo: Any = IntegratedGradients(model) if is_ig else Saliency(model)
    kwargs: dict[str, Any] = {"target": target}
    if is_ig:
        kwargs.update(baselines=base.expand_as(x).contiguous(), n_steps=n_steps,
                      internal_batch_size=max(1, internal_batch_size))
    else:
        kwargs["abs"] = True
    x = x.detach().clone().requires_grad_(True)  # what Captum would do, without its warning
    if not smoothgrad:
        return algo.attribute(x, **kwargs).detach()
    std = 0.15 * float(x.max() - x.min())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return NoiseTunnel(algo).attribute(x, nt_type="smoothgrad", nt_samples=nt_samples, stdevs=std,
                                           nt_samples_batch_size=1 if is_ig else None, **kwargs).detach()


def scale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each non-negative map (N, ...) to [0, 1] by its maximum; all-zero maps stay zero.

    Non-finite values (a diverging model) are set to 0 first, so maps are always finite.
    """
    m = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    peak = m.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, *([1] * (m.ndim - 1)))
    return (m / peak).clamp(0, 1)
