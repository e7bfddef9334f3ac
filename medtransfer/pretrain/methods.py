"""The self-supervised methods, built from lightly's heads and losses around a medtransfer encoder.

Each method is an ``nn.Module`` whose ``forward(view_a, view_b)`` returns the loss of one batch (so
DistributedDataParallel can wrap it whole) and whose :meth:`SSLMethod.after_step` updates a momentum teacher.
The encoder is a :class:`~medtransfer.models.classifier.Classifier`; only its ``features`` (pooled, (N, F)) are
used, so every 2D backbone medtransfer can fine-tune can be pretrained, timm's included.

- SimCLR (Chen et al. 2020): two views of each image are pulled together and pushed away from the other
  images of the batch (NT-Xent). Needs no teacher; its signal grows with the batch (more negatives).
- BYOL (Grill et al. 2020): the student's prediction of a momentum teacher's projection of the other view; no
  negatives, so it works with small batches, but the teacher's EMA makes it slower to move.
- DINO (Caron et al. 2021): the student matches a centred, sharpened teacher's distribution over
  prototypes; two global views only here (multi-crop small views would be mostly rib at chest X-ray scale).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from medtransfer._optional import require
from medtransfer.config import PretrainConfig


class SSLMethod(nn.Module):
    """Base: an encoder (``student``), a loss over two views, and an optional momentum teacher."""

    name = ""

    def __init__(self, encoder: nn.Module, feature_dim: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_dim = int(feature_dim)
        self.cfg = cfg

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after every optimiser step with the share of training done (0-1)."""

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the encoder (projection/prediction heads): they get a larger LR."""
        inside = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in inside]


def _frozen_copy(module: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _momentum(cfg: PretrainConfig, progress: float) -> float:
    """Teacher EMA momentum: from ``cfg.momentum`` up to 1 on a cosine (BYOL's schedule)."""
    return 1 - (1 - cfg.momentum) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2


@torch.no_grad()
def _ema(student: nn.Module, teacher: nn.Module, m: float) -> None:
    for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
        pt.mul_(m).add_(ps.detach(), alpha=1 - m)
    for bs, bt in zip(student.buffers(), teacher.buffers(), strict=True):
        bt.copy_(bs)


class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(self, encoder: nn.Module, feature_dim: int, cfg: PretrainConfig, *, distributed: bool = False
                 ) -> None:
        super().__init__(encoder, feature_dim, cfg)
        lightly_modules = require("lightly.models.modules", extra="ssl", purpose="self-supervised pretraining")
        lightly_loss = require("lightly.loss", extra="ssl", purpose="self-supervised pretraining")
        hidden = min(2048, max(256, feature_dim))
        self.projection = lightly_modules.SimCLRProjectionHead(feature_dim, hidden, cfg.projection_dim)
        self.criterion = lightly_loss.NTXentLoss(temperature=cfg.temperature, gather_distributed=distributed)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        z_a = self.projection(self.encoder.features(view_a))
        z_b = self.projection(self.encoder.features(view_b))
        return self.criterion(z_a, z_b)


class BYOL(SSLMethod):
    name = "byol"

    def __init__(self, encoder: nn.Module, feature_dim: int, cfg: PretrainConfig, **_: Any) -> None:
        super().__init__(encoder, feature_dim, cfg)
        lightly_modules = require("lightly.models.modules", extra="ssl", purpose="self-supervised pretraining")
        lightly_loss = require("lightly.loss", extra="ssl", purpose="self-supervised pretraining")
        hidden = min(4096, max(512, 2 * feature_dim))
        self.projection = lightly_modules.BYOLProjectionHead(feature_dim, hidden, cfg.projection_dim)
        self.prediction = lightly_modules.BYOLPredictionHead(cfg.projection_dim, hidden, cfg.projection_dim)
        self.teacher_encoder = _frozen_copy(encoder)
        self.teacher_projection = _frozen_copy(self.projection)
        self.criterion = lightly_loss.NegativeCosineSimilarity()

    def _student(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction(self.projection(self.encoder.features(x)))

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_projection(self.teacher_encoder.features(x)).detach()

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        p_a, p_b = self._student(view_a), self._student(view_b)
        z_a, z_b = self._teacher(view_a), self._teacher(view_b)
        return 0.5 * (self.criterion(p_a, z_b) + self.criterion(p_b, z_a))

    def after_step(self, progress: float) -> None:
        m = _momentum(self.cfg, progress)
        _ema(self.encoder, self.teacher_encoder, m)
        _ema(self.projection, self.teacher_projection, m)


class DINO(SSLMethod):
    name = "dino"

    #: Prototypes: far fewer than DINO's 65,536, which are sized for ImageNet at GPU scale.
    OUTPUT_DIM = 2048

    def __init__(self, encoder: nn.Module, feature_dim: int, cfg: PretrainConfig, **_: Any) -> None:
        super().__init__(encoder, feature_dim, cfg)
        lightly_modules = require("lightly.models.modules", extra="ssl", purpose="self-supervised pretraining")
        lightly_loss = require("lightly.loss", extra="ssl", purpose="self-supervised pretraining")
        hidden = min(2048, max(256, feature_dim))
        def head() -> nn.Module:
            return lightly_modules.DINOProjectionHead(feature_dim, hidden, cfg.projection_dim, self.OUTPUT_DIM)

        self.projection = head()
        self.teacher_encoder = _frozen_copy(encoder)
        # a fresh head loaded with the student's weights: weight-normed layers cannot be deep-copied
        self.teacher_projection = head()
        self.teacher_projection.load_state_dict(self.projection.state_dict())
        for p in self.teacher_projection.parameters():
            p.requires_grad_(False)
        self.criterion = lightly_loss.DINOLoss(output_dim=self.OUTPUT_DIM, warmup_teacher_temp_epochs=0,
                                               teacher_temp=0.04)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        student = [self.projection(self.encoder.features(v)) for v in (view_a, view_b)]
        with torch.no_grad():
            teacher = [self.teacher_projection(self.teacher_encoder.features(v)).detach() for v in (view_a, view_b)]
        return self.criterion(teacher, student)

    def after_step(self, progress: float) -> None:
        m = _momentum(self.cfg, progress)
        _ema(self.encoder, self.teacher_encoder, m)
        _ema(self.projection, self.teacher_projection, m)


METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "byol": BYOL, "dino": DINO}


def build_method(name: str, encoder: nn.Module, feature_dim: int, cfg: PretrainConfig, *,
                 distributed: bool = False) -> SSLMethod:
    """The method ``name`` (``simclr``, ``byol``, ``dino``) around ``encoder``."""
    return METHODS[name](encoder, feature_dim, cfg, distributed=distributed)
