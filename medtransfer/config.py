"""Configuration: what the user chose, validated (pydantic, frozen, ``extra="forbid"``).

What is learned from data (thresholds, temperature, prevalence) never lives here: it goes to the model card
or the evaluation result (scikit-learn's rule). YAML files and ``--set key=value`` CLI overrides fill the
same fields; an unknown key fails with the nearest valid key, as MONAI's ``look_up_option`` does.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtransfer.data.spec import InputSpec
from medtransfer.errors import ConfigError

DEFAULT_AGE_BANDS = (18, 40, 60, 80)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    """Where the scans are and how cases are split.

    Attributes:
        data_dir: the scan folder (class sub-folders, or any layout with ``labels``).
        labels: CSV with a ``path`` column relative to ``data_dir`` and a ``label`` column or 0/1/blank columns.
        label_columns: for multi-label CSVs, the 0/1/blank columns to use (blank = unknown, masked).
        val_fraction, test_fraction: patient-level split fractions (ignored where the CSV has ``split``).
        seed: split seed.
        age_bands: lower edges of age bands after the first, in years: (18, 40, 60, 80) gives
            0-17, 18-39, 40-59, 60-79, 80+.
        strict: stop at the first unreadable scan instead of quarantining it.
        verify_pixels: decode every case once while indexing so that bad pixel data is quarantined up front
            rather than crashing a long training job later.
        cache_dir: where decoded, preprocessed images are cached; default ``<run>/cache``.
        fit_input_size: lower ``input.size`` to fit small source images (see ``medtransfer.training.sizing``).
        max_volume_voxels: volumes with more voxels (from their headers, before decoding) are quarantined.
        max_obliquity: volumes whose slices are tilted further from the nearest anatomical plane (degrees) are
            quarantined.
    """

    data_dir: Path | None = None
    labels: Path | None = None
    label_columns: tuple[str, ...] | None = None
    val_fraction: float = Field(default=0.15, ge=0, lt=1)
    test_fraction: float = Field(default=0.15, ge=0, lt=1)
    seed: int = 0
    age_bands: tuple[int, ...] = DEFAULT_AGE_BANDS
    strict: bool = False
    verify_pixels: bool = True
    cache_dir: Path | None = None
    fit_input_size: bool | None = Field(default=None, description=(
        "Lower `input.size` when the scans are small: to twice the median source size (rounded up to a multiple "
        "of 32, at least 64 px), never above the configured size, so 28-px images are not upsampled to 224. "
        "`null` (default): only when `input.size` was not set explicitly (a preset's or the default size is a "
        "ceiling; `--image-size` or your own `input.size` is used as given); `true`/`false`: always/never."))
    max_volume_voxels: int = Field(default=1 << 28, ge=1, description=(
        "Volumes with more voxels than this (read from their headers, before decoding) are quarantined: the "
        "default 2**28 (268 million, 1 GiB as float32, e.g. 1024x512x512) keeps one decoded volume well within "
        "a laptop's memory. Raise it on a machine with more memory."))
    max_obliquity: float = Field(default=30.0, ge=0, le=90, description=(
        "Volumes whose slices are tilted more than this many degrees from the nearest axial, coronal or sagittal "
        "plane are quarantined (they are read in their own grid, labelled by the nearest anatomical axes, which "
        "becomes ambiguous towards 45 degrees). Reformat such series, or raise this to accept them."))

    @field_validator("age_bands")
    @classmethod
    def _bands_increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)) or any(b <= 0 for b in v):
            raise ValueError(f"age_bands must be positive and strictly increasing, got {list(v)}")
        return v


class AugmentConfig(_Frozen):
    """Train-only augmentation (never applied at evaluation). Probabilities are per image."""

    flip_prob: float = Field(default=0.5, ge=0, le=1, description=(
        "Probability of a left-right flip (never up-down). Set 0 where laterality matters."))
    rotate_degrees: float = Field(default=10.0, ge=0, le=180, description=(
        "Rotation angle drawn uniformly in +/- this many degrees for every image, in plane; 0 turns it off."))
    zoom: tuple[float, float] = Field(default=(0.9, 1.1), description=(
        "Zoom factor range `[low, high]`, drawn uniformly for every image, size kept; `[1.0, 1.0]` turns it off."))
    intensity_prob: float = Field(default=0.3, ge=0, le=1, description=(
        "Probability of each intensity change: a gamma in (0.7, 1.5) (contrast) and a shift of +/-0.1 "
        "(brightness), then clamped to [0, 1]; 0 turns them off."))
    enabled: bool = Field(default=True, description="Master switch: `false` turns every augmentation off.")


class ModelConfig(_Frozen):
    """Which backbone and which pretrained weights.

    Attributes:
        backbone: a name from ``medtransfer backbones``.
        weights: ``"imagenet"`` (the backbone's default pretrained weights), ``"none"`` (random init, i.e.
            training from scratch), or a path to a local weights file (for air-gapped sites).
        dropout: dropout before the new head.
        volume: for volumes only (``input.size`` with 3 entries): how the model sees them.
        slice_context: ``volume: slices`` only: 3 adjacent slices as RGB, or 1 slice alone.

    With ``volume: native`` and no backbone/weights of your own, the backbone is ``resnet10_3d`` from scratch
    (weights ``none``); choosing a 3D backbone implies ``volume: native``.
    """

    #: The 3D networks of the backbone table (models/backbones.py; a test checks the two agree). Listed here
    #: because the config layer sits below the models layer and cannot read the table.
    NATIVE_BACKBONES: ClassVar[tuple[str, ...]] = ("resnet10_3d", "resnet18_3d")
    NATIVE_DEFAULT: ClassVar[str] = "resnet10_3d"

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    dropout: float = Field(default=0.2, ge=0, lt=1)
    volume: Literal["slices", "acs", "native"] = Field(default="slices", description=(
        "Volumes only (`input.size` with 3 entries; ignored for images). `slices` (2.5D): the 2D ImageNet "
        "backbone encodes every slice and attention pooling weighs the slices (the weights are saved with "
        "predictions); `acs`: the same ImageNet weights as 3D convolutions (ACS: each 2D kernel on the axial, "
        "coronal and sagittal planes); `native`: a 3D network trained from scratch (default `resnet10_3d`), the "
        "baseline the transfer audit compares against."))
    slice_context: Literal[1, 3] = Field(default=3, description=(
        "`volume: slices` only: 3 feeds slices (s-1, s, s+1) as the RGB input of slice s, so the pretrained first "
        "convolution is used unchanged (needs one input channel); 1 feeds each slice alone through the "
        "grey-adapted first convolution (any number of channels, e.g. several CT windows)."))

    @model_validator(mode="after")
    def _volume_backbone(self) -> ModelConfig:
        # Defaults are filled without marking the field as set (object.__setattr__ on a frozen model, as
        # InputSpec does): apply_overrides re-validates with exclude_unset, so they are derived again.
        given = self.model_fields_set
        three_d = self.backbone in self.NATIVE_BACKBONES
        if three_d and "volume" not in given:
            object.__setattr__(self, "volume", "native")
        if self.volume == "native":
            if "backbone" not in given:
                object.__setattr__(self, "backbone", self.NATIVE_DEFAULT)
            elif not three_d:
                raise ValueError(
                    f"model.volume=native trains a 3D network from scratch, but model.backbone={self.backbone} is a "
                    f"2D ImageNet backbone; set model.backbone to one of {', '.join(self.NATIVE_BACKBONES)} (or "
                    f"leave it unset), or keep {self.backbone} with model.volume=slices or acs, which carry its "
                    "ImageNet weights into 3D")
            if "weights" not in given:
                object.__setattr__(self, "weights", "none")
            elif self.weights == "imagenet":
                raise ValueError(
                    f"{self.backbone} is a 3D network without ImageNet weights: set model.weights to none (from "
                    "scratch) or to a local weights file (e.g. MedicalNet's); for ImageNet weights in 3D use "
                    "model.volume=slices or acs with a 2D backbone")
        elif three_d:
            raise ValueError(
                f"model.backbone={self.backbone} is a 3D network: use it with model.volume=native; "
                f"model.volume={self.volume} reuses a 2D ImageNet backbone such as efficientnet_lite0")
        return self


class TrainConfig(_Frozen):
    """How to fine-tune. Presets live in ``configs/`` (quickstart, chexnet, linear-probe, demo)."""

    strategy: Literal["linear-probe", "fine-tune", "gradual"] = Field(default="gradual", description=(
        "`linear-probe`: backbone frozen, only the new head trains, on features cached once; `fine-tune`: all "
        "layers train from the first epoch; `gradual`: the head trains on cached features for `freeze_epochs`, "
        "then all layers with discriminative LRs (fastai)."))
    epochs: int = Field(default=8, ge=1, description=(
        "Maximum number of epochs in all (gradual: head epochs included); early stopping may end sooner."))
    freeze_epochs: int = Field(default=2, ge=0, description=(
        "`gradual` only: head-only epochs before the backbone unfreezes; `>= epochs` makes it a linear probe."))
    batch_size: int = Field(default=32, ge=1, description=(
        "Images per optimiser step (the global batch: under torchrun each of N processes takes batch_size / N, "
        "and with `accumulate` k each takes it in k micro-batches), and per inference batch for validation and "
        "calibration."))
    accumulate: int = Field(default=1, ge=1, description=(
        "Gradient accumulation: each optimiser step sums gradients over this many micro-batches of "
        "batch_size / (processes x accumulate) images, for global batches larger than memory allows."))
    sync_bn: bool = Field(default=False, description=(
        "Under torchrun on CUDA: SyncBatchNorm, so BatchNorm statistics come from the global batch, not each "
        "GPU's share (useful when the per-GPU batch is small, < 16). Ignored in one process and on the CPU."))
    lr: float = Field(default=1e-3, gt=0, description=(
        "Base learning rate: the head's; backbone stages get lower LRs under `lr_decay`."))
    lr_decay: float = Field(default=0.5, gt=0, le=1, description=(
        "Discriminative LRs: backbone stage k below the head gets `lr * lr_decay**k` (`gradual`; `fine-tune` "
        "when below 1); 1 gives every layer the same LR."))
    # gradual only: after unfreezing, every group's LR is multiplied by this (fastai halves its base LR)
    unfreeze_lr_factor: float = Field(default=0.3, gt=0, le=1)
    # BatchNorm while the backbone trains: "frozen" keeps ImageNet running statistics (eval mode), "train"
    # updates them; "auto" = frozen for gradual from pretrained weights (the head was fitted on features made
    # with those statistics), train otherwise (scratch must learn its statistics). See docs/decisions.md.
    bn: Literal["auto", "frozen", "train"] = "auto"
    # Re-estimate BatchNorm statistics over the training data after each epoch ("precise BN"); None = auto:
    # on when training from scratch, where momentum-averaged statistics are still mostly the random init's.
    precise_bn: bool | None = None
    weight_decay: float = Field(default=1e-4, ge=0, description=(
        "Weight decay of weight tensors (never of biases and normalisation parameters): decoupled under `adamw`, "
        "an L2 penalty under `adam` and `sgd`."))
    optimizer: Literal["adamw", "adam", "sgd"] = Field(default="adamw", description=(
        "`adamw`, `adam`, or `sgd` (momentum 0.9, Nesterov)."))
    scheduler: Literal["cosine", "onecycle", "plateau", "none"] = Field(default="cosine", description=(
        "`cosine`: linear warmup, then cosine decay to 1% (stepped per batch); `onecycle`: one-cycle (per batch); "
        "`plateau`: multiply the LR by `plateau_factor` when `plateau_on` stops improving (per epoch, CheXNet); "
        "`none`: constant LR. Each phase of `gradual` gets its own schedule."))
    warmup_epochs: float = Field(default=0.5, ge=0, description=(
        "`cosine` only: epochs (fractions allowed) of linear warmup at the start of each phase."))
    plateau_factor: float = Field(default=0.1, gt=0, lt=1, description=(
        "`plateau` only: LR multiplier applied when the watched metric stops improving."))
    plateau_patience: int = Field(default=1, ge=0, description=(
        "`plateau` only: epochs without improvement before the LR is reduced."))
    plateau_on: Literal["val_auroc", "val_loss"] = Field(default="val_auroc", description=(
        "`plateau` only: the metric watched, `val_auroc` (higher is better) or `val_loss` (lower is better)."))
    patience: int = Field(default=5, ge=1, description=(
        "Early stopping: stop after this many epochs without a better validation AUROC (checked in the last "
        "phase only); the best epoch's weights are kept."))
    grad_clip: float | None = Field(default=1.0, description=(
        "Clip the global gradient norm to this value; `null` turns clipping off."))
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description=(
        "Label smoothing: targets move towards 0.5 (binary, multi-label) or uniform (multi-class)."))
    class_weights: bool = Field(default=True, description=(
        "Weight rare classes up: pos_weight = negatives/positives in BCE (binary, per class for multi-label), "
        "inverse-frequency weights in cross-entropy (multi-class)."))
    device: str = Field(default="auto", description=(
        "`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."))
    amp: bool = Field(default=True, description=(
        "Mixed precision on CUDA: bfloat16 where supported, else float16 with loss scaling. On the CPU see "
        "`cpu_bf16`."))
    cpu_bf16: bool = Field(default=False, description=(
        "bfloat16 autocast for inference (prediction, evaluation, calibration) on CPUs with native bfloat16 "
        "(AVX512-BF16, AMX; ignored elsewhere): ~3.5x faster at 224 px, but probabilities can move by ~0.1 "
        "against float32, so it is off by default. CPU training always runs in float32."))
    channels_last: bool = Field(default=True, description=(
        "`channels_last` memory format for convolutions, on CUDA and on the CPU (1.1-1.7x faster on the CPU)."))
    num_workers: int = Field(default=0, ge=0, description=(
        "DataLoader worker processes; 0 loads images in the main process."))
    seed: int = Field(default=0, description=(
        "Training seed: head initialisation, shuffling, augmentation. Every epoch is reseeded from "
        "(seed, epoch), so a resumed run repeats an uninterrupted one."))
    deterministic: bool = Field(default=True, description=(
        "Ask torch for deterministic kernels (a warning, not an error, where an operation has none)."))
    augment: AugmentConfig = AugmentConfig()
    tensorboard: bool = Field(default=False, description=(
        "Also write TensorBoard event files to `<run>/tensorboard` (`tensorboard` extra)."))
    mlflow: bool = Field(default=False, description=(
        "Also log parameters and per-epoch metrics to MLflow (`mlflow` extra; MLflow's own tracking URI)."))


class EvalConfig(_Frozen):
    """How to evaluate: the defaults of ``medtransfer evaluate`` / ``mt.evaluate`` for this run (its options
    override them), and how the operating point is chosen on validation at the end of training."""

    split: str = Field(default="test", description=(
        "The run's split to evaluate (test, val, train); `medtransfer evaluate --split` overrides it."))
    subgroups: tuple[str, ...] = Field(default=("sex", "age_band", "site"), description=(
        "Manifest columns to break metrics down by; `medtransfer evaluate --subgroups` overrides it."))
    n_boot: int = Field(default=1000, ge=0, description=(
        "Bootstrap resamples (by patient) for CIs; 0 = no CIs. `medtransfer evaluate --n-boot` overrides it."))
    ci: float = Field(default=0.95, gt=0, lt=1, description=(
        "Confidence level of the intervals; `medtransfer evaluate --ci` overrides it."))
    min_group_size: int = Field(default=10, ge=1, description=(
        "Subgroups with fewer patients are listed but not assessed; `medtransfer evaluate --min-group-size` "
        "overrides it."))
    threshold: Literal["youden", "sensitivity", "specificity"] = Field(default="youden", description=(
        "How the operating point is chosen on the validation split at the end of training (stored in the "
        "model card): `youden` maximises sensitivity + specificity - 1; `sensitivity` takes the highest "
        "threshold with validation sensitivity >= `target`; `specificity` the lowest with specificity >= `target`."))
    target: float | None = Field(default=None, gt=0, lt=1, description=(
        "The sensitivity or specificity to reach; required when `threshold` is `sensitivity` or `specificity`."))

    @model_validator(mode="after")
    def _target_needed(self) -> EvalConfig:
        # checked when the config is loaded, not after hours of training when the threshold is chosen
        if self.threshold != "youden" and self.target is None:
            raise ValueError(f"eval.threshold={self.threshold} needs eval.target (e.g. eval.target=0.9: the "
                             f"{self.threshold} to reach on validation)")
        return self


class ReportConfig(_Frozen):
    """What the report says about itself."""

    title: str = Field(default="medtransfer model report", description=(
        "Report title; also the model name in the model card."))
    banner: str = Field(default="Research use only — not for clinical decision making", description=(
        "Status line at the top of the report, in the Model Facts label and in the footer."))
    contact: str = Field(default="not provided", description=(
        "Who to contact about the model (Model Facts label and footer)."))
    intended_use: str = Field(default="not provided", description=(
        "Intended use statement (Model Facts label and the data section)."))


class PretrainConfig(_Frozen):
    """Self-supervised pretraining on unlabelled scans (``medtransfer pretrain``); unused by ``train``.

    The backbone, its starting weights (``model.weights``, ImageNet by default), the input size and the
    device/AMP settings come from the ``model``, ``input`` and ``train`` sections, as for training.
    """

    method: Literal["simclr", "byol", "dino"] = Field(default="simclr", description=(
        "`simclr`: contrastive (NT-Xent over the other images of the batch); `byol`: a predictor matches a "
        "momentum teacher, no negatives; `dino`: self-distillation with a centred, sharpened teacher. SimCLR is "
        "the default by measurement on CPU-sized data (docs/guide-train.md)."))
    epochs: int = Field(default=20, ge=1, description="Passes over the unlabelled images.")
    batch_size: int = Field(default=64, ge=2, description=(
        "Images per step (two views each). Contrastive methods see batch_size - 1 negatives per image."))
    lr: float = Field(default=1e-4, gt=0, description=(
        "Backbone learning rate (AdamW, warmup then cosine); the projection heads use 10x. Small, since the "
        "backbone starts from pretrained weights and should move, not restart."))
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    warmup_epochs: float = Field(default=1.0, ge=0, description="Linear LR warmup.")
    temperature: float = Field(default=0.1, gt=0, description="SimCLR's NT-Xent temperature.")
    projection_dim: int = Field(default=128, ge=8, description="Output size of the projection head.")
    momentum: float = Field(default=0.99, gt=0, lt=1, description=(
        "BYOL/DINO: the teacher's starting EMA momentum (rises to 1 on a cosine schedule)."))
    crop_scale: tuple[float, float] = Field(default=(0.6, 1.0), description=(
        "Random-resized-crop area range. Mild on purpose: a crop of 8% (ImageNet SSL's default) of a chest "
        "X-ray is often a patch of rib with no finding in it."))
    rotation: float = Field(default=10.0, ge=0, le=45, description="Random rotation range in degrees (+/-).")
    flip: bool = Field(default=False, description=(
        "Random horizontal flips. Off by default: left and right are not interchangeable in a radiograph "
        "(heart, stomach bubble, markers)."))
    intensity: float = Field(default=0.2, ge=0, le=1, description=(
        "Random contrast and brightness change (scale 1 +/- intensity, shift +/- intensity/2 SD). Grey "
        "images: no colour jitter."))
    blur: float = Field(default=0.5, ge=0, le=1, description="Probability of a Gaussian blur.")
    noise: float = Field(default=0.05, ge=0, le=1, description="Gaussian noise SD (normalised units).")
    max_images: int | None = Field(default=None, ge=2, description=(
        "Use at most this many images (a seeded sample of patients); None = all."))


class RunConfig(_Frozen):
    """Everything a run needs; saved as ``config.yaml`` in the run directory."""

    data: DataConfig = DataConfig()
    input: InputSpec = InputSpec()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    report: ReportConfig = ReportConfig()
    pretrain: PretrainConfig = PretrainConfig()


# medtransfer/configs is a symlink to the repository's configs/, so wheels ship the presets too.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str | Path | None) -> Path | None:
    """A config file path, or a preset name (``quickstart``, ``chexnet``, ``linear-probe``) from ``configs/``."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return p
    preset = PRESETS_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    names = sorted(f.stem for f in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else f" (presets: {', '.join(names) or 'none found'})"
    raise ConfigError(f"config '{name}' is neither a file nor a preset{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, and validate.

    An error names where the offending key came from: the YAML file (its path), or the override that set it
    (``--set train.pateince=3``), so that a typo on the command line is not blamed on the preset.

    Args:
        path: YAML file or a preset name (``quickstart``, ``chexnet``, ``linear-probe``); ``None`` starts
            from the defaults.
        overrides: ``["train.epochs=3", "model.backbone=resnet18"]`` (values parsed as YAML, as ``--set``
            gives them) or a nested dict.

    Raises:
        ConfigError: unknown key (with a did-you-mean suggestion), wrong type, or unreadable file.

    Examples:
        >>> cfg = load_config(None, ["train.epochs=3"])
        >>> cfg.train.epochs
        3
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        p = resolve_config_path(path) or Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found. Pass an existing YAML file, e.g. configs/quickstart.yaml")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc}).") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data, model, train, ...).")
        layers.append((str(p), raw))
    layers += _override_layers(overrides)
    return _validate_layers(layers)


def validate_config(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a nested dict as a :class:`RunConfig`; unknown keys fail with a suggestion naming ``source``."""
    return _validate_layers([(source, raw)])


def apply_overrides(cfg: RunConfig, overrides: Sequence[str] | None) -> RunConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied and validated (errors name the override)."""
    if not overrides:
        return cfg
    # exclude_unset: a field the caller never set stays unset (training tells an explicit input.size from a default)
    return _validate_layers([("the given config", cfg.model_dump(mode="json", exclude_unset=True)),
                             *_override_layers(list(overrides))])


def parse_override(item: str) -> dict[str, Any]:
    """Turn ``"train.epochs=3"`` into ``{"train": {"epochs": 3}}`` (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: an override must look like section.key=value, e.g. train.epochs=3")
    key, value = item.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise ConfigError(f"--set {item}: the key before '=' is empty; write section.key=value, e.g. train.epochs=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    out: dict[str, Any] = {parts[-1]: parsed}
    for k in reversed(parts[:-1]):
        out = {k: out}
    return out


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text (paths as strings, tuples as lists)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _override_layers(overrides: list[str] | dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(source label, nested dict) per override: ``--set key=value`` strings each name themselves."""
    if isinstance(overrides, dict):
        return [("overrides", overrides)]
    return [(f"--set {item}", parse_override(item)) for item in overrides or []]


def _validate_layers(layers: Sequence[tuple[str, dict[str, Any]]]) -> RunConfig:
    """Merge ``(source, dict)`` layers in order (later wins) and validate; errors name the source of the key.

    Unknown keys are checked layer by layer, so the message names the layer holding the typo; a bad value is
    traced through ``origins`` (dotted key -> source of its current value) to the layer that set it last.
    """
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for source, layer in layers:
        _check_unknown_keys(layer, RunConfig, prefix="", source=source)
        raw = _deep_merge(raw, layer)
        for key in _leaf_keys(layer):
            for other in [k for k in origins if k.startswith(key + ".") or key.startswith(k + ".")]:
                del origins[other]  # replaced wholesale, or a scalar replaced by a section
            origins[key] = source
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        source = _source_of(where, origins) or (layers[-1][0] if layers else "config")
        got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
        raise ConfigError(f"{source}: '{where}': {first['msg']}{got}.") from exc


def _leaf_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of the values in a nested dict that are not non-empty dicts themselves."""
    keys: list[str] = []
    for k, v in d.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            keys += _leaf_keys(v, f"{dotted}.")
        else:
            keys.append(dotted)
    return keys


def _source_of(where: str, origins: dict[str, str]) -> str | None:
    """The source(s) that set the key at ``where``: the key itself or a section above it, else keys inside it."""
    parts = where.split(".") if where else []
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return origins[".".join(parts[:n])]
    inside = [s for k, s in origins.items() if not where or k.startswith(where + ".")]
    return " and ".join(dict.fromkeys(inside)) or None  # a section-level check: every source that touched it


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_unknown_keys(raw: Any, model: type[BaseModel], *, prefix: str, source: str) -> None:
    if not isinstance(raw, dict):
        return
    fields = model.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            candidates = [f"{prefix}{f}" for f in fields]
            close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
            hint = f" — did you mean '{close[0]}'?" if close else f" (valid keys: {', '.join(candidates)})"
            raise ConfigError(f"{source}: unknown key '{dotted}'{hint}")
        sub = fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_unknown_keys(value, sub, prefix=f"{dotted}.", source=source)
