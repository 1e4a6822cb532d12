"""The ``baseline`` recipe: one model, ``train.loss`` under ``train.sampler``, then evaluated.

Losses: ``ce`` (cross-entropy), ``balanced_softmax`` (logits + log prior), ``logit_adjusted``
(``tau`` x log prior added during training). Samplers: ``instance``, ``class_balanced``, ``sqrt``,
``progressive``. No sections of its own: everything is in the common sections.

Stages: ``train`` -> ``RUN/train/model.pt`` (each epoch record in ``RUN/train/log.jsonl`` carries
``val_top1`` when ``data.val_split`` is set); ``eval`` -> ``RUN/metrics.*``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lfme_fast.config import fingerprint
from lfme_fast.losses import balanced_softmax_loss, logit_adjusted_loss, weighted_cross_entropy
from lfme_fast.recipes.base import Recipe, TrainJob, TrainParts, ValAccuracyHook
from lfme_fast.trainer import MODEL_KEYS

__all__ = ["BaselineRecipe", "baseline_loss"]


def baseline_loss(kind: str, class_counts: Any, tau: float = 1.0) -> Callable[[Any, torch.Tensor], Any]:
    """``loss_fn(batch, logits)`` for ``train.loss`` = ``kind`` (class counts on the logits' device)."""
    if kind == "ce":
        return lambda batch, logits: weighted_cross_entropy(logits, batch.labels)
    if kind == "balanced_softmax":
        return lambda batch, logits: balanced_softmax_loss(logits, batch.labels, class_counts)
    if kind == "logit_adjusted":
        return lambda batch, logits: logit_adjusted_loss(logits, batch.labels, class_counts, tau)
    raise ValueError(f"train.loss={kind!r} is not supported by the baseline recipe (ce, balanced_softmax, "
                     "logit_adjusted)")


class BaselineRecipe(Recipe):
    """One model trained with ``train.loss`` under ``train.sampler``, then evaluated."""

    STAGES = ("train", "eval")
    SECTIONS: dict[str, type] = {}

    @property
    def stage_dir(self):
        return self.run_dir / "train"

    @property
    def train_fingerprint(self) -> str:
        return fingerprint(self.cfg, MODEL_KEYS, self.ctx.model_fingerprint_extra())

    def _build(self) -> TrainParts:
        cfg, ctx = self.cfg, self.ctx
        epochs = cfg.optim.epochs
        sampler = ctx.build_sampler(cfg.train.sampler, ctx.labels(cfg.data.train_split), epochs)
        counts = torch.as_tensor(ctx.train_counts, device=ctx.device)
        return TrainParts(model=ctx.build_model(ctx.num_classes), loader=ctx.train_loader(sampler, epochs),
                          loss_fn=baseline_loss(cfg.train.loss, counts, cfg.train.tau), hooks=ValAccuracyHook(self))

    def stage_train(self) -> None:
        cfg = self.cfg
        self.train_stage(TrainJob("train", self.stage_dir, self.train_fingerprint, self._build,
                                  meta={"arch": cfg.model.arch, "num_classes": self.ctx.num_classes}))

    def stage_eval(self) -> None:
        cfg = self.cfg
        t = cfg.train
        self.eval_stage(model_dir=self.stage_dir, model_fp=self.train_fingerprint, model_stage="train",
                        recipe_info={"loss": t.loss, "sampler": t.sampler, "arch": cfg.model.arch,
                                     "epochs": cfg.optim.epochs},
                        title=f"{cfg.name}: {cfg.model.arch}, {t.loss}, {t.sampler} sampling")
