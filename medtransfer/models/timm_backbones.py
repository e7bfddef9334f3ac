"""timm backbones (``--backbone timm:<name>``): a backbone spec read from timm's own metadata at run time.

Any model of timm's zoo is named ``timm:<architecture>[.<pretrained tag>]`` as timm spells it
(``timm:convnext_tiny``, ``timm:vit_small_patch16_224.dino``, ``timm:resnet50.a1_in1k``). Nothing about it is
kept in a hand-made table: the fields of :class:`~medtransfer.models.backbones.BackboneSpec` come from the
model timm builds (on the ``meta`` device, so no memory is spent and no weights are read):

* ``pretrained_cfg``: input size, mean/std, ``first_conv`` (grey input sums its RGB filters, as for
  torchvision backbones), ``classifier`` (the head replaced by the new one), ``fixed_input_size``, the weights'
  Hugging Face hub repo and tag;
* a trace of ``forward_features`` + ``forward_head(pre_logits=True)`` on a small input: the feature size, and the
  layout of the last feature map. Convolutional maps (N, C, h, w): the CAM layer is the last module that
  produces it (timm's ``feature_info`` stops before a final 1x1 conv head, e.g. EfficientNet's ``conv_head``);
  channels-last maps (N, h, w, C; Swin, MambaOut): the same, reshaped ``nhwc``. Transformer tokens
  (N, prefix + h*w, C): the last block's ``norm1``, whose patch tokens feed the last attention (the final norm's
  patch tokens never reach a class-token head, so their gradients are zero), reshaped by dropping the
  ``num_prefix_tokens`` (class and register tokens) and laying the rest on the patch grid;
* ``group_matcher(coarse=True)``: the stages for gradual unfreezing and discriminative LRs, merged into at most
  :data:`MAX_STAGES` contiguous stages (the stem alone, then the blocks in four runs), like the torchvision table.

ViT-family models that support it are built with ``dynamic_img_size=True, dynamic_img_pad=True`` (position
embeddings interpolated, the image padded to whole patches), so any input size works; others keep timm's
``fixed_input_size``.

Pretrained weights (``weights: imagenet``: the tag's weights) are read from the Hugging Face hub cache, and
downloaded (with a short timeout) only when not cached and neither ``MEDTRANSFER_OFFLINE`` nor ``HF_HUB_OFFLINE``
is set; otherwise :class:`~medtransfer.errors.WeightsUnavailable` names the hub repo and file, the cache folder
and how to fetch them. Files are read with medtransfer's safe reader (safetensors, or ``torch.load(weights_only=
True)``), never timm's loader, then passed through the architecture's ``checkpoint_filter_fn`` where timm has one.

This module does not import timm or torch at import time; the ``timm`` extra provides timm.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata as md
import logging
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtransfer._optional import require
from medtransfer.errors import ConfigError, MedtransferError, WeightsUnavailable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

#: The backbone-name prefix that selects a timm model.
TIMM_PREFIX = "timm:"
#: Side (px) of the input traced to read the feature layout when the model takes any size.
TRACE_SIDE = 64
#: Most stages a timm backbone is split into (the torchvision table uses 4 or 5).
MAX_STAGES = 5
#: Files timm publishes on the hub, preferred first (timm's own order).
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_TRUE = {"1", "true", "yes", "on"}
_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)?")


def is_timm(name: str) -> bool:
    """Whether backbone ``name`` names a timm model (``timm:<name>``)."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def timm_name(name: str) -> str:
    """The timm model name of backbone ``name`` (``timm:resnet50.a1_in1k`` → ``resnet50.a1_in1k``)."""
    return name[len(TIMM_PREFIX):] if is_timm(name) else name


def valid_timm_name(name: str) -> bool:
    """Whether ``name`` has the shape of a timm backbone name, ``timm:<arch>[.<tag>]`` (no timm import)."""
    return is_timm(name) and _NAME.fullmatch(timm_name(name)) is not None


def timm_version() -> str | None:
    """The installed timm version, or None when timm is not installed."""
    try:
        return md.version("timm")
    except md.PackageNotFoundError:
        return None


def _timm() -> Any:
    return require("timm", extra="timm", purpose="timm backbones (--backbone timm:<name>)")


def check_name(name: str) -> str:
    """The timm model name of ``name``, after checking that timm knows its architecture and tag.

    Raises:
        ConfigError: an unknown architecture (with the closest names) or tag (with the tags timm has).
        MissingDependency: timm is not installed.
    """
    timm = _timm()
    rest = timm_name(name)
    arch, _, tag = rest.partition(".")
    if not valid_timm_name(TIMM_PREFIX + rest) or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" — did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown timm model '{rest}'{hint} Name one as timm does, 'timm:<architecture>"
                          "[.<pretrained tag>]'; 'medtransfer backbones --timm PATTERN' lists them.")
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise ConfigError(f"timm model {arch} has no pretrained tag '{tag}'; its tags are "
                              f"{', '.join(tags) or 'none'} (timm {timm_version()}).")
    return rest


# -- building -----------------------------------------------------------------------------------------------
def _dynamic_kwargs() -> dict[str, bool]:
    return {"dynamic_img_size": True, "dynamic_img_pad": True}


def create_model(name: str, *, device: str | None = None) -> nn.Module:
    """timm model ``name`` with its original head, randomly initialised (never downloads anything).

    ViT-family models that accept ``dynamic_img_size``/``dynamic_img_pad`` get both (any input size); extra
    classifier heads (DeiT's distillation head) become ``nn.Identity`` so the pooled features are the average
    of the class and distillation tokens, as timm's ``forward_head(pre_logits=True)`` returns.

    Args:
        name: ``timm:<name>`` or ``<name>``.
        device: ``"meta"`` to build without allocating (metadata and shape tracing only).
    """
    import torch
    from torch import nn

    timm = _timm()
    rest = check_name(name)
    with torch.device(device) if device else nullcontext():
        try:
            model = timm.create_model(rest, pretrained=False, **_dynamic_kwargs())
        except Exception as exc:  # noqa: BLE001 - its constructor does not take them (TypeError) or refuses them
            logger.debug("timm:%s without dynamic image size (%s: %s)", rest, type(exc).__name__, exc)
            model = timm.create_model(rest, pretrained=False)
    for path in _classifier_paths(model)[1:]:
        _set_path(model, path, nn.Identity())
    return model


def _classifier_paths(model: Any) -> list[str]:
    cls = model.pretrained_cfg.get("classifier")
    return [cls] if isinstance(cls, str) else list(cls or [])


def _get_path(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: Any, path: str, module: Any) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_path(root, parent) if parent else root, leaf, module)


@dataclass(frozen=True)
class _Trace:
    fmap: tuple[int, ...]  # forward_features' output shape
    feature_dim: int  # forward_head(pre_logits=True) size
    cam_layer: str  # last module producing a tensor of fmap's shape ('' if none)


def _trace(model: Any, side: int) -> _Trace:
    import torch
    from torch import nn

    seen: list[tuple[str, Any]] = []
    hooks = []
    for mname, module in model.named_modules():
        if mname and not isinstance(module, nn.Identity):
            def hook(_m: nn.Module, _i: Any, out: Any, mname: str = mname) -> None:
                if isinstance(out, torch.Tensor):
                    seen.append((mname, out))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, side, side, device=next(model.parameters()).device)
            fmap = model.forward_features(x)
            pooled = model.forward_head(fmap, pre_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return _Trace(tuple(fmap.shape), int(pooled.shape[-1]), _last_map_module(model, seen, fmap))


def _last_map_module(model: Any, seen: list[tuple[str, Any]], fmap: Any) -> str:
    """The module that outputs the last feature map ``fmap``.

    timm's ``feature_info`` module when it returns ``fmap`` itself (``layer4``, ``stages.3``); else the last module
    returning it (or a tensor of its shape), a container (``stages``) named by its last child (``stages.3``).
    """
    from torch import nn

    same = [n for n, t in seen if t is fmap] or [n for n, t in seen if tuple(t.shape) == tuple(fmap.shape)]
    info = [str(f.get("module", "")) for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict)]
    named = [n for n in info if n in same]
    if named:
        return named[-1]
    if not same:
        return ""
    name = same[-1]
    mod = _get_path(model, name)
    if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod):
        child = f"{name}.{len(mod) - 1}"
        if dict(seen).get(child) is dict(seen)[name]:
            name = child
    return name


@functools.lru_cache(maxsize=32)
def spec_fields(name: str) -> dict[str, Any]:
    """The :class:`~medtransfer.models.backbones.BackboneSpec` fields of backbone ``timm:<name>``.

    Built from timm's metadata and a shape trace on the ``meta`` device (falls back to the CPU for the rare
    model whose initialisation the meta device cannot run). Cached per name.

    Raises:
        ConfigError: unknown model or tag; a model whose pretrained config names no classifier.
    """
    rest = check_name(name)
    try:
        model = create_model(rest, device="meta")
        trace = _trace_at_size(model)
    except MedtransferError:
        raise
    except Exception as exc:  # noqa: BLE001 - an init or op the meta device lacks: do it for real
        logger.debug("timm:%s: meta-device trace failed (%s); tracing on the CPU", rest, exc)
        model = create_model(rest)
        trace = _trace_at_size(model)
    cfg = model.pretrained_cfg
    heads = _classifier_paths(model)
    if not heads:
        raise ConfigError(f"timm:{rest}: timm's pretrained_cfg names no classifier, so the head to replace is "
                          "unknown; choose another timm model.")
    first_conv = cfg.get("first_conv")
    first_conv = first_conv if isinstance(first_conv, str) else (list(first_conv or []) or [""])[0]
    channels = model.num_features
    fixed = bool(cfg.get("fixed_input_size", False)) and not getattr(model, "dynamic_img_size", False)
    cam_layer, cam_reshape = trace.cam_layer, None
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    blocks = getattr(model, "blocks", None)
    if len(trace.fmap) == 3:  # transformer tokens (N, L, C)
        cam_reshape = "vit_tokens"
        if blocks is not None and len(blocks) and hasattr(blocks[-1], "norm1"):
            cam_layer = f"blocks.{len(blocks) - 1}.norm1"
        elif blocks is not None and len(blocks) > 1:
            cam_layer = f"blocks.{len(blocks) - 2}"  # its output is the last block's input
        else:
            cam_layer = ""
    elif len(trace.fmap) == 4 and trace.fmap[1] != channels and trace.fmap[-1] == channels:
        cam_reshape = "nhwc"
    arch = cfg.get("architecture") or rest.partition(".")[0]
    tag = cfg.get("tag")
    hub, url = cfg.get("hf_hub_id"), cfg.get("url")
    weights = f"hf-hub:{hub}" if hub else (url or "none")
    where = f"Hugging Face hub {hub}" if hub else url or "no pretrained weights"
    source = f"timm {arch}{'.' + tag if tag else ''} ({where})"
    return {
        "name": TIMM_PREFIX + rest,
        "builder": "timm:create_model",
        "weights": weights,
        "head": heads[0],
        "first_conv": first_conv,
        "cam_layer": cam_layer,
        "stages": _stages(model, heads),
        "feature_dim": trace.feature_dim,
        "input_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "source": source,
        "mean": tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        "cam_reshape": cam_reshape,
        "fixed_input_size": fixed,
        "acs": False,  # timm's forward passes are not checked for ACS conversion; use volume: slices
        "num_prefix_tokens": prefix if cam_reshape == "vit_tokens" else 0,
    }


def _trace_at_size(model: Any) -> _Trace:
    fixed = model.pretrained_cfg.get("fixed_input_size", False) and not getattr(model, "dynamic_img_size", False)
    side = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]) if fixed else TRACE_SIDE
    try:
        return _trace(model.eval(), side)
    except Exception:
        if fixed:
            raise
        return _trace(model, int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]))


def _stages(model: Any, heads: list[str]) -> tuple[tuple[str, ...], ...]:
    """timm's coarse parameter groups (stem, blocks..., final norm), merged into at most MAX_STAGES stages."""
    def in_head(n: str) -> bool:
        return any(n == h or n.startswith(h + ".") for h in heads)

    names = [n for n, _ in model.named_parameters() if not in_head(n)]
    groups: list[list[str]] = []
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        try:
            from timm.models._manipulate import group_parameters

            grouped = group_parameters(model, matcher(coarse=True))
            groups = [[n for n in g if not in_head(n)] for _, g in sorted(grouped.items())]
        except Exception as exc:  # noqa: BLE001 - a matcher timm itself cannot apply: use the module tree
            logger.debug("group_matcher failed (%s); stages from the top-level modules", exc)
            groups = []
    if not groups or sum(len(g) for g in groups) != len(names):
        top: dict[str, list[str]] = {}
        for n in names:
            top.setdefault(n.split(".")[0], []).append(n)
        groups = list(top.values())
    groups = [g for g in groups if g]
    merged = [groups[0]] if groups else []
    rest = groups[1:]
    k = min(MAX_STAGES - 1, len(rest))
    for i in range(k):
        lo, hi = len(rest) * i // k, len(rest) * (i + 1) // k
        merged.append([n for g in rest[lo:hi] for n in g])
    return tuple(_compress(model, g) for g in merged)


def _compress(model: Any, params: list[str]) -> tuple[str, ...]:
    """The fewest dotted paths (modules whose every parameter is in ``params``, else parameters) covering them."""
    chosen = set(params)
    owned: dict[str, set[str]] = {}
    for n, _ in model.named_parameters():
        parts = n.split(".")
        for k in range(1, len(parts)):
            owned.setdefault(".".join(parts[:k]), set()).add(n)
    out: list[str] = []
    for n in params:
        parts = n.split(".")
        path = next((p for p in (".".join(parts[:k]) for k in range(1, len(parts))) if owned[p] <= chosen), n)
        if path not in out:
            out.append(path)
    return tuple(out)


# -- weights ------------------------------------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (as huggingface_hub reads it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids hub downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@dataclass(frozen=True)
class PretrainedSource:
    """Where timm publishes the weights of one model tag.

    Attributes:
        model: ``<architecture>.<tag>`` (the tag resolved when the name gave none).
        tag: the pretrained tag, or None.
        hf_hub_id: the hub repo (``timm/resnet50.a1_in1k``), or None.
        files: the files to look for in the repo, preferred first.
        url: a direct download URL when the weights are not on the hub.
    """

    model: str
    tag: str | None
    hf_hub_id: str | None
    files: tuple[str, ...]
    url: str | None


def pretrained_source(name: str) -> PretrainedSource | None:
    """Where ``name``'s pretrained weights live, from timm's pretrained config (None: timm has none)."""
    timm = _timm()
    rest = check_name(name)
    cfg = timm.models.get_pretrained_cfg(rest)
    if cfg is None:
        return None
    arch = cfg.architecture or rest.partition(".")[0]
    hub = cfg.hf_hub_id or None
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
    if not hub and not cfg.url:
        return None
    return PretrainedSource(f"{arch}.{cfg.tag}" if cfg.tag else arch, cfg.tag, hub, files, cfg.url or None)


def cached_weights(src: PretrainedSource) -> Path | None:
    """The cached weights file of ``src`` (hub cache, or torch's hub checkpoints for URL-only weights), or None."""
    if src.hf_hub_id:
        repo = hf_cache_dir() / ("models--" + src.hf_hub_id.replace("/", "--"))
        for fname in src.files:
            try:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(src.hf_hub_id, fname, cache_dir=str(hf_cache_dir()))
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
            except Exception as exc:  # noqa: BLE001 - a malformed cache entry: look for the file below
                logger.debug("hub cache lookup failed for %s/%s: %s", src.hf_hub_id, fname, exc)
            snaps = sorted((repo / "snapshots").glob(f"*/{fname}")) if repo.is_dir() else []
            if snaps and snaps[-1].is_file():
                return snaps[-1]
        return None
    if src.url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(src.url)
        return path if path.is_file() else None
    return None


def fetch_weights(name: str, *, offline: bool, offline_reason: str, timeout: float) -> tuple[Path, PretrainedSource]:
    """The weights file of ``name``'s pretrained tag: from the cache, else downloaded from the hub.

    Args:
        name: ``timm:<name>``.
        offline: never download (medtransfer's offline switch); ``HF_HUB_OFFLINE`` is honoured too.
        offline_reason: how to name the switch in the message.
        timeout: seconds the hub may take to answer before it counts as unreachable.

    Raises:
        WeightsUnavailable: no weights for this tag, or not cached and not downloadable; the message names the
            hub repo and file, the cache folder and the fixes.
    """
    src = pretrained_source(name)
    if src is None:
        raise WeightsUnavailable(
            f"{TIMM_PREFIX}{timm_name(name)}: timm publishes no pretrained weights for this model. Pass "
            "--weights none (train from scratch) or --weights-file PATH (your own .safetensors/.pth), or name a "
            "tag that has weights ('medtransfer backbones --timm PATTERN' lists them).")
    path = cached_weights(src)
    if path is not None:
        return path, src
    if offline or hf_offline():
        reason = offline_reason if offline else "HF_HUB_OFFLINE is set"
        raise WeightsUnavailable(unavailable_message(name, src, reason))
    try:
        path = _download(src, timeout)
    except Exception as exc:  # no network, timeout, missing file, read-only cache
        raise WeightsUnavailable(unavailable_message(name, src, f"download failed: {type(exc).__name__}: "
                                                     f"{str(exc).splitlines()[0] if str(exc) else ''}")) from exc
    return path, src


def _download(src: PretrainedSource, timeout: float) -> Path:
    if not src.hf_hub_id:
        raise OSError(f"weights only at {src.url}; medtransfer downloads timm weights from the hub only")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    # etag_timeout bounds the first request; reads then use huggingface_hub's own timeout (HF_HUB_DOWNLOAD_TIMEOUT,
    # 10 s by default). Changing that process-wide setting here would change every other download in the process.
    for i, fname in enumerate(src.files):
        try:
            logger.info("%s: downloading %s from the Hugging Face hub repo %s", src.model, fname, src.hf_hub_id)
            return Path(hf_hub_download(src.hf_hub_id, fname, cache_dir=str(hf_cache_dir()), etag_timeout=timeout))
        except EntryNotFoundError:
            if i == len(src.files) - 1:
                raise
    raise OSError("no files to download")  # pragma: no cover - files is never empty


def unavailable_message(name: str, src: PretrainedSource, reason: str) -> str:
    """The WeightsUnavailable message: what is missing, where it is expected, and the ways to fix it."""
    cache = hf_cache_dir()
    label = f"{TIMM_PREFIX}{timm_name(name)}"
    if src.hf_hub_id:
        where = (f"timm reads them from the Hugging Face hub repo {src.hf_hub_id} (file {src.files[0]}) through the "
                 f"hub cache {cache}")
        fetch = (f"on a connected machine run 'hf download {src.hf_hub_id} {src.files[0]}' (or python -c \"import "
                 f"timm; timm.create_model('{src.model}', pretrained=True)\") and copy its cache folder "
                 f"models--{src.hf_hub_id.replace('/', '--')} into {cache} (or point HF_HUB_CACHE at a copy)")
    else:
        where = f"timm downloads them from {src.url}"
        fetch = f"download {src.url} on a connected machine and pass it with --weights-file"
    return (f"{label}: pretrained weights (timm tag {src.tag or 'default'}) are not available ({reason}). {where}. "
            f"Fixes: (1) {fetch}; (2) pass --weights-file PATH to load a local copy (.safetensors or .pth); "
            "(3) pass --weights none to train from scratch (random init: expect much worse results on small data "
            "sets). Or choose --backbone efficientnet_lite0, which works offline.")


def filter_state_dict(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as the model expects it: the architecture's ``checkpoint_filter_fn`` (timm's key conversion and
    position-embedding resampling) where its module has one; extra classifier heads' tensors dropped."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(fn):
        try:
            state = dict(fn(state, model))
        except Exception as exc:  # noqa: BLE001 - the file is already in timm's layout; strict loading checks it
            logger.debug("%s.checkpoint_filter_fn did not apply (%s); loading the tensors as they are",
                         type(model).__module__, exc)
    extra = _classifier_paths(model)[1:]
    return {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in extra)}


def weights_available(name: str) -> bool:
    """Whether ``name``'s pretrained weights are in the local cache (no network access)."""
    src = pretrained_source(name)
    return src is not None and cached_weights(src) is not None


def fingerprint(name: str, weights: str) -> dict[str, Any]:
    """What the model card records about a timm backbone: the model, its pretrained tag, the hub repo and timm's
    version (a run rebuilt by another timm version is warned about)."""
    src = pretrained_source(name)
    rest = check_name(name)
    return {"timm_model": src.model if src else rest, "pretrained_tag": src.tag if src else None,
            "hf_hub_id": src.hf_hub_id if src and weights == "imagenet" else None, "timm_version": timm_version()}


def version_warning(card_weights: dict[str, Any], backbone: str) -> str | None:
    """A warning when a run's timm version differs from the installed one, else None."""
    trained = card_weights.get("timm_version")
    installed = timm_version()
    if not is_timm(backbone) or not trained or trained == installed:
        return None
    return (f"{backbone}: this run was trained with timm {trained}, but timm {installed} is installed; the "
            "architecture is rebuilt by the installed timm, so a changed model fails to load or may give slightly "
            f"different outputs. Install timm=={trained} to reproduce it exactly.")


# -- listing ------------------------------------------------------------------------------------------------
def cached_timm_models() -> list[str]:
    """Backbone names of the timm models whose weights are in the hub cache (read from the folder; no timm import)."""
    root = hf_cache_dir()
    out = []
    for repo in sorted(root.glob("models--timm--*")) if root.is_dir() else []:
        if any(any((repo / "snapshots").glob(f"*/{f}")) for f in HUB_FILES):
            out.append(TIMM_PREFIX + repo.name.removeprefix("models--timm--"))
    return out


def list_timm(pattern: str = "*") -> list[dict[str, Any]]:
    """One row per pretrained timm model matching ``pattern`` (fnmatch, as ``timm.list_models``).

    Returns:
        rows with ``name`` (``timm:<arch>.<tag>``), ``input_size``, ``weights`` (hub repo or URL) and
        ``available`` (cached on this machine).
    """
    timm = _timm()
    pat = timm_name(pattern) or "*"
    rows = []
    for n in timm.list_models(pat, pretrained=True):
        cfg = timm.models.get_pretrained_cfg(n)
        if cfg is None:
            continue
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        src = PretrainedSource(n, cfg.tag, cfg.hf_hub_id or None, files, cfg.url or None)
        rows.append({"name": TIMM_PREFIX + n, "input_size": int(cfg.input_size[-1]),
                     "weights": src.hf_hub_id or src.url or "none",
                     "available": (src.hf_hub_id or src.url) is not None and cached_weights(src) is not None})
    return rows
