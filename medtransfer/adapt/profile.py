"""``SiteProfile``: what adapting a run to one site learned, kept beside the run as plain JSON + safetensors.

A profile never changes the run. :meth:`SiteProfile.apply` returns a new :class:`~medtransfer.run_dir.Run`
whose model and card carry the site's adaptation, so ``Run.predict``, evaluation and reports work unchanged:

- BatchNorm running statistics re-estimated on the site's scans (AdaBN) replace the model's;
- a label-shift (prevalence) correction is folded into the bias of the head's final linear layer. With
  temperature T, probabilities are ``sigmoid(z / T)`` (softmax for multi-class); a shift ``d`` of the
  probability logits is ``z + T * d`` on the raw logit, so ``logit_bias = T * d`` is what is added. ``d`` is
  Bayes' rule for a new prior: per class ``logit(prior) - logit(training prior)`` (binary, multi-label) or
  ``log(prior / training prior)`` (multi-class, up to a constant that softmax ignores);
- a head fine-tuned on the site's labelled cases replaces the head's weights;
- the card gets the profile's temperature and operating points.

Files: ``profile.json`` (everything but tensors), ``bn_stats.safetensors`` (BatchNorm buffers, if any) and
``head.safetensors`` (the fine-tuned head's state dict, if any; such a profile is version 2, which older
medtransfer refuses instead of silently ignoring the head);
never a pickle. A profile records the sha256 of the run's ``model_card.json`` and is refused by another run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from medtransfer import io
from medtransfer.digest import sha256_file
from medtransfer.errors import CheckpointError
from medtransfer.models.weights_io import CARD_FILE, load_safetensors_file
from medtransfer.run_dir import Run

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
BN_FILE = "bn_stats.safetensors"
HEAD_FILE = "head.safetensors"
PROFILE_FORMAT = "medtransfer-site-profile"
#: 2 when the profile carries a fine-tuned head (older readers must refuse it), else 1.
PROFILE_VERSION = 2
#: Priors are kept away from 0 and 1 so their log-odds stay finite.
PRIOR_EPS = 1e-6


def card_sha256(run: Run) -> str:
    """The sha256 of the run's ``model_card.json`` on disk: the identity a profile is bound to."""
    path = Path(run.path) / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a site profile belongs to a saved run directory (written by "
                              "'medtransfer train').")
    return sha256_file(path, memoise=False)


def prior_offsets(prior: dict[str, float], training_prior: dict[str, float], classes: list[str],
                  task: str) -> np.ndarray:
    """Bayes' rule for a new class prior, as a shift of the probability logits, one entry per model output.

    Args:
        prior: the site's prevalence per class (binary: both classes, or just the positive one).
        training_prior: the training split's prevalence, same keys.
        classes: the card's classes; task: binary / multiclass / multilabel.

    Returns:
        float64 (K,): binary (1,) ``logit(pi'_1) - logit(pi_1)``; multi-label per class the same; multi-class
        ``log(pi'_k / pi_k)``. Adding it to ``z / T`` gives the posterior under the site's prior.

    Examples:
        >>> prior_offsets({"neg": 0.8, "pos": 0.2}, {"neg": 0.5, "pos": 0.5}, ["neg", "pos"], "binary").round(4)
        array([-1.3863])
    """
    def clip(v: float) -> float:
        return float(np.clip(v, PRIOR_EPS, 1 - PRIOR_EPS))

    if task == "multiclass":
        return np.array([np.log(clip(prior[c]) / clip(training_prior[c])) for c in classes])
    scored = [classes[1]] if task == "binary" else list(classes)
    return np.array([np.log(clip(prior[c]) / (1 - clip(prior[c])))
                     - np.log(clip(training_prior[c]) / (1 - clip(training_prior[c]))) for c in scored])


def batchnorm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm's ``running_mean`` and ``running_var``, by state-dict name (copies, on the CPU)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            out[f"{name}.running_mean"] = m.running_mean.detach().cpu().clone()
            out[f"{name}.running_var"] = m.running_var.detach().cpu().clone()
    return out


def final_linear(model: nn.Module) -> nn.Linear:
    """The head's last linear layer (whose bias takes the prior correction)."""
    head = getattr(model, "head", model)
    linear = getattr(head, "linear", None)  # the attention-MIL head of 2.5D volume models
    if not isinstance(linear, nn.Linear):
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        linear = linears[-1] if linears else None
    if linear is None or linear.bias is None:
        raise CheckpointError("the model's head has no linear layer with a bias; a prevalence correction cannot "
                              "be folded into it")
    return linear


@dataclass
class SiteProfile:
    """How one site's predictions are adapted (module docstring).

    Attributes:
        name: the site's name (``RUN/sites/<name>``).
        run_card_sha256: sha256 of the run's ``model_card.json``; another run refuses the profile.
        created: ISO 8601 timestamp.
        options: what is applied, among ``adabn``, ``prevalence``, ``head``, ``temperature``, ``threshold``
            (empty: the run as it is).
        temperature: the temperature predictions use with this profile (None: none, T = 1).
        thresholds: the operating point per scored class (None: the card's).
        prior: the site's estimated prevalence per class (None: not estimated).
        training_prior: the training split's prevalence per class.
        logit_bias: added to the final layer's bias, one per output (already multiplied by the temperature;
            None: no prevalence correction).
        bn_stats: BatchNorm ``running_mean``/``running_var`` by state-dict name (AdaBN; None: the run's).
        head: the fine-tuned head's state dict (None: the run's head).
        evidence: the before/after table (records) and the figures behind each decision, as JSON.
        notes: what was applied or skipped, and why (never silent).
    """

    name: str
    run_card_sha256: str
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    options: list[str] = field(default_factory=list)
    temperature: float | None = None
    thresholds: dict[str, float] | None = None
    prior: dict[str, float] | None = None
    training_prior: dict[str, float] | None = None
    logit_bias: list[float] | None = None
    bn_stats: dict[str, torch.Tensor] | None = None
    head: dict[str, torch.Tensor] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``profile.json`` and (with AdaBN) ``bn_stats.safetensors`` into ``folder``, atomically.

        The tensors are written first and ``profile.json`` last, recording the tensor file's sha256: a crash
        leaves either no profile or a complete one. Returns the folder.
        """
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("bn_stats", "head")}
        record.update({"format": PROFILE_FORMAT, "version": 2 if self.head else 1})
        for key, file_name, tensors in (("bn_stats_file", BN_FILE, self.bn_stats), ("head_file", HEAD_FILE, self.head)):
            record[key] = None
            if tensors:
                state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
                with io.atomic_path(d / file_name) as tmp:
                    save_file(state, str(tmp), metadata={"format": "pt"})
                record[key] = {"name": file_name, "sha256": sha256_file(d / file_name, memoise=False)}
            elif (d / file_name).exists():
                (d / file_name).unlink()
        io.write_json(d / PROFILE_FILE, record)
        return d

    @classmethod
    def load(cls, folder: str | os.PathLike[str], run: Run) -> SiteProfile:
        """Read a profile written by :meth:`save` for ``run``.

        Raises:
            CheckpointError: no profile there, a corrupt one, or a profile made for another run (both named).
        """
        d = Path(folder)
        path = d / PROFILE_FILE if d.is_dir() else d
        d = path.parent
        if not path.is_file():
            raise CheckpointError(f"{path}: no site profile here. Make one with 'medtransfer adapt RUN SITE_DATA'.")
        try:
            raw = io.read_json(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); make the profile again with 'medtransfer "
                                  "adapt'.") from exc
        if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
            raise CheckpointError(f"{path}: not a medtransfer site profile.")
        if int(raw.get("version", 0)) > PROFILE_VERSION:
            raise CheckpointError(f"{path}: site profile version {raw['version']} is newer than this medtransfer "
                                  f"understands ({PROFILE_VERSION}); upgrade medtransfer.")
        mine = card_sha256(run)
        if raw.get("run_card_sha256") != mine:
            raise CheckpointError(
                f"{path}: site profile '{raw.get('name')}' was made for another run (model card sha256 "
                f"{str(raw.get('run_card_sha256'))[:12]}…), not for {run.path} (model card sha256 {mine[:12]}…). "
                "Adapt this run to the site again: medtransfer adapt RUN SITE_DATA.")
        loaded: dict[str, dict[str, torch.Tensor] | None] = {}
        for key, field_name in (("bn_stats_file", "bn_stats"), ("head_file", "head")):
            entry = raw.get(key)
            loaded[field_name] = None
            if entry:
                tensors = d / str(entry["name"])
                if not tensors.is_file() or sha256_file(tensors, memoise=False) != entry["sha256"]:
                    raise CheckpointError(f"{tensors}: missing or not the file profile.json names (sha256 differs); "
                                          "make the profile again with 'medtransfer adapt'.")
                loaded[field_name] = load_safetensors_file(tensors)
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in raw.items() if k in names and k not in loaded}
        return cls(**kept, **loaded)

    def apply(self, run: Run) -> Run:
        """A new Run adapted to this site; ``run`` (its model and card) is left untouched.

        Raises:
            CheckpointError: the profile's BatchNorm statistics or bias do not fit this run's model.
        """
        model = copy.deepcopy(run.model)
        if self.bn_stats:
            buffers = dict(model.named_buffers())
            unknown = [k for k, v in self.bn_stats.items() if k not in buffers or buffers[k].shape != v.shape]
            if unknown:
                raise CheckpointError(f"site profile '{self.name}': BatchNorm statistics {unknown[:3]} do not fit "
                                      "this run's model; make the profile again with 'medtransfer adapt'.")
            with torch.no_grad():
                for k, v in self.bn_stats.items():
                    buffers[k].copy_(v.to(buffers[k].device, buffers[k].dtype))
        if self.head:
            try:
                model.head.load_state_dict(self.head, strict=True)
            except (RuntimeError, AttributeError) as exc:
                raise CheckpointError(f"site profile '{self.name}': its fine-tuned head does not fit this run's "
                                      f"model ({exc}); make the profile again with 'medtransfer adapt'.") from exc
        if self.logit_bias is not None:
            linear = final_linear(model)
            if linear.bias.numel() != len(self.logit_bias):
                raise CheckpointError(f"site profile '{self.name}': {len(self.logit_bias)} logit offsets for a "
                                      f"model with {linear.bias.numel()} outputs")
            with torch.no_grad():
                linear.bias.add_(torch.tensor(self.logit_bias, dtype=linear.bias.dtype, device=linear.bias.device))
        update: dict[str, Any] = {"temperature": self.temperature}
        if self.thresholds is not None:
            update["thresholds"] = dict(self.thresholds)
        note = f"Site profile '{self.name}' applied ({', '.join(self.options) or 'no adaptation'})."
        update["notes"] = f"{run.card.notes} {note}".strip()
        card = run.card.model_validate({**run.card.model_dump(), **update})
        return dataclasses.replace(run, model=model.eval(), card=card)
