"""The ECL recipe: M collaborative experts trained together, then evaluated (stages ``train``, ``eval``).

ECL is "Towards Effective Collaborative Learning in Long-Tailed Recognition" (Xu et al., arXiv 2305.03378,
IEEE TMM 2023). **Only its abstract is public.** The equations implemented here are OUR READING of that
abstract, written down before the code (README, "ECL"); no formula is the paper's own. NCL (Li et
al., CVPR 2022, official code Bazinga699/NCL) is the closest public relative and supplies the defaults;
BCL (Zhu et al., CVPR 2022) supplies the contrastive loss. Every component is switchable
(``ecl.kd``, ``ecl.reweight``, ``ecl.feature_kd``, ``ecl.contrastive``) so that its effect can be measured.

``python lfme_fast/train.py --config configs/fmnist_lt/ecl.yaml`` runs it (registered in
``lfme_fast.recipes.RECIPES`` as ``"ecl"``; config section ``ecl``, :class:`ECLConfig`).

Model (:class:`lfme_fast.models.MultiExpert`): ``ecl.num_experts`` experts on ``model.arch``, sharing the
first ``ecl.shared_stages`` backbone stages (0 = separate backbones, NCL's choice). Expert i has a feature
f_i, a label classifier g_i, a distillation classifier h_i (built only when ``ecl.kd``) and a contrastive
projection head (built only when ``ecl.contrastive``), so that no parameter goes unused under DDP.

Loss per step (:func:`lfme_fast.losses.ecl_loss`, REFERENCE.md's total)::

    sum_i [ L_bs(g_i) + lambda_kd mean_b omega_{y_b} L_kd,i(b) + lambda_feat L_feat,i ] + lambda_con L_con

* ``L_bs``: balanced softmax (logits + log training prior) of each label classifier; always on.
* ``L_kd,i`` (``ecl.kd``): ``T^2 KL(softmax(mean_{j!=i} g_j / T) || softmax(h_i / T))``, peers detached.
* ``omega`` (``ecl.reweight``, only meaningful with ``kd``): per-class EMAs (momentum ``ecl.ema_momentum``)
  of the true-class probability (T = 1, no prior) of g and of h, averaged over experts, held by
  :class:`ECLHook` and saved in every checkpoint (a resumed run is exact);
  ``omega_c = clip((a_lab[c] / a_kd[c])^gamma, 1/kappa, kappa)``, renormalised to batch mean 1. The step's
  weights are read *before* the EMA takes that step's batch; with several processes the batch
  statistics are all-reduced first, so every rank holds the same EMA.
* ``L_feat,i`` (``ecl.feature_kd``): ``1 - cos(f_i, stopgrad(mean_{j!=i} f_j))``.
* ``L_con`` (``ecl.contrastive``): BCL over both augmented views of each sample (the loader yields two
  views per index), summed over experts, temperature ``ecl.con_temperature``.

The classifier terms (``L_bs``, ``L_kd``, ``L_feat``) and the EMA read the first view only, so switching
the contrastive branch on or off leaves their inputs unchanged; the second view feeds only ``L_con``.

Sampling: ``train.sampler`` (``instance`` in the shipped configs, as NCL; any sampler works).
``train.loss`` must be ``balanced_softmax`` (the label classifiers' loss) and ``model.classifier``
``linear`` (the experts' heads are linear).

Every step record in ``RUN/train/log.jsonl`` carries the loss parts (``bs``, ``bs_per_expert`` and, when
on, ``kd``/``kd_per_expert``, ``feat``/``feat_per_expert``, ``con``/``con_per_expert``); with
re-weighting each epoch record adds ``ecl_omega``, ``ecl_acc_label``, ``ecl_acc_kd`` (class means per
``eval`` subset).

Eval: the prediction is the mean of the label-classifier logits (without the prior) of the experts in
``ecl.inference_experts`` (null = all). ``metrics.json`` adds ``ecl.experts``: each expert's own top-1,
overall and per subset (``ecl.experts_val`` likewise on the val split when there is one).

Config section ``ecl`` (:class:`ECLConfig`): ``num_experts``, ``shared_stages``, ``feature_dim``,
``proj_dim``, ``kd``, ``reweight``, ``feature_kd``, ``contrastive``, ``lambda_kd``, ``lambda_feat``,
``lambda_con``, ``temperature``, ``con_temperature``, ``gamma``, ``kappa``, ``ema_momentum``,
``inference_experts``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lfme_fast.config import Check, Config, fingerprint
from lfme_fast.evaluate import Predictions, classification_metrics, predict
from lfme_fast.losses import ECLAccuracyEMA, LossParts, ecl_loss, ecl_raw_class_weights
from lfme_fast.recipes.base import Recipe, TrainJob, TrainParts, ValAccuracyHook
from lfme_fast.subsets import Subset, split_classes
from lfme_fast.trainer import MODEL_KEYS, TrainHooks

__all__ = ["ECLConfig", "ECLRecipe", "ECLHook", "ECLLoss", "ECL_TRAIN_KEYS", "build_multi_expert",
           "backbone_stages", "expert_metrics", "ensemble_predictions"]


@dataclass(frozen=True)
class ECLConfig:
    """Config section ``ecl`` (see the module docstring; defaults from REFERENCE.md / NCL)."""

    num_experts: int = 3
    shared_stages: int = 0
    feature_dim: int | None = None
    proj_dim: int = 128
    kd: bool = True
    reweight: bool = True
    feature_kd: bool = True
    contrastive: bool = True
    lambda_kd: float = 1.0
    lambda_feat: float = 1.0
    lambda_con: float = 0.5
    temperature: float = 2.0
    con_temperature: float = 0.07
    gamma: float = 1.0
    kappa: float = 4.0
    ema_momentum: float = 0.9
    inference_experts: tuple[int, ...] | None = None

    def resolve(self, cfg: Config, check: Check) -> "ECLConfig":
        """Range checks naming the key; the common keys ECL constrains (``train.loss``, ``model.classifier``,
        ``data.augment`` with the contrastive branch, ``model.arch`` against ``shared_stages``)."""
        self._check_values(check)
        self._check_common(cfg, check)
        return self

    def _check_values(self, check: Check) -> None:
        check(self.num_experts >= 1, "ecl.num_experts", f"must be >= 1, got {self.num_experts}")
        peers = [k for k, on in (("ecl.kd", self.kd), ("ecl.feature_kd", self.feature_kd)) if on]
        check(self.num_experts >= 2 or not peers, "ecl.num_experts",
              f"must be >= 2 while {' and '.join(peers)} {'is' if len(peers) == 1 else 'are'} on (distillation "
              f"needs peers), got {self.num_experts}")
        check(self.feature_dim is None or self.feature_dim >= 1, "ecl.feature_dim", "must be >= 1 or null")
        check(self.proj_dim >= 1, "ecl.proj_dim", f"must be >= 1, got {self.proj_dim}")
        for key in ("lambda_kd", "lambda_feat", "lambda_con"):
            v = getattr(self, key)
            check(math.isfinite(v) and v >= 0, f"ecl.{key}", f"must be a finite number >= 0, got {v}")
        for key in ("temperature", "con_temperature"):
            v = getattr(self, key)
            check(math.isfinite(v) and v > 0, f"ecl.{key}", f"must be a finite number > 0, got {v}")
        check(math.isfinite(self.gamma) and self.gamma >= 0, "ecl.gamma",
              f"must be a finite number >= 0, got {self.gamma}")
        check(math.isfinite(self.kappa) and self.kappa >= 1, "ecl.kappa",
              f"must be a finite number >= 1, got {self.kappa}")
        check(0 <= self.ema_momentum < 1, "ecl.ema_momentum", f"must be in [0, 1), got {self.ema_momentum}")
        if self.inference_experts is not None:
            ids = list(self.inference_experts)
            check(bool(ids) and len(set(ids)) == len(ids) and all(0 <= i < self.num_experts for i in ids),
                  "ecl.inference_experts",
                  f"must be null (all) or distinct expert ids in [0, {self.num_experts}), got {ids}")

    def _check_common(self, cfg: Config, check: Check) -> None:
        check(cfg.train.loss == "balanced_softmax", "train.loss",
              f"the ecl recipe trains its label classifiers with the balanced softmax: set it to balanced_softmax "
              f"(got {cfg.train.loss!r})")
        check(cfg.model.classifier == "linear", "model.classifier",
              f"the ecl recipe's experts have linear heads: set it to linear (got {cfg.model.classifier!r})")
        check(not (self.contrastive and cfg.data.augment == "none"), "ecl.contrastive",
              "needs two differently augmented views per sample, but data.augment is none (the views would be "
              "identical): set data.augment (auto, pad_crop or imagenet) or ecl.contrastive=false")
        try:
            stages = backbone_stages(cfg.model.arch, **cfg.model.kwargs)
        except (TypeError, ValueError) as exc:  # a backbone MultiExpert cannot split, or bad kwargs
            raise check.fail("model.arch", f"cannot be used by the ecl recipe: {exc}") from None
        check(0 <= self.shared_stages <= stages, "ecl.shared_stages",
              f"must be in [0, {stages}] for {cfg.model.arch} ({stages} residual stages), got {self.shared_stages}")


#: The ``ecl`` keys the trained model depends on (``inference_experts`` only changes the evaluation).
ECL_TRAIN_KEYS = tuple(f"ecl.{f.name}" for f in dataclasses.fields(ECLConfig) if f.name != "inference_experts")


def backbone_stages(arch: str, **kwargs: Any) -> int:
    """How many residual stages :class:`~lfme_fast.models.MultiExpert` can share for ``arch``.

    Built on the meta device, so no memory is allocated and no weights are initialised for real.
    """
    from lfme_fast.models import MultiExpert

    with torch.device("meta"):
        return MultiExpert(arch, 2, num_experts=1, kd_head=False, proj_head=False, **kwargs).num_stages


def build_multi_expert(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The run's :class:`~lfme_fast.models.MultiExpert`, initialised from ``cfg.seed`` (every process
    builds the same one); heads only for the switched-on terms (DDP must see no unused parameter)."""
    from lfme_fast.models import MultiExpert

    e, m = cfg.ecl, cfg.model
    torch.manual_seed(cfg.seed)
    return MultiExpert(m.arch, num_classes, e.num_experts, e.shared_stages, feature_dim=e.feature_dim,
                       proj_dim=e.proj_dim, kd_head=e.kd, proj_head=e.contrastive, pretrained_path=m.pretrained,
                       **m.kwargs)


# ---------------------------------------------------------------------------------------------------
# two views per sample (the contrastive branch)
# ---------------------------------------------------------------------------------------------------


def second_view(batch: Any) -> torch.Tensor:
    """The second augmented view of each sample in ``batch`` (row j of both views is sample
    ``batch.indices[j]``); a clear error when the loader was built with one view."""
    images2 = getattr(batch, "images2", None)
    if images2 is None:
        raise ValueError("ecl.contrastive needs a second view per sample, but the batch has none (the training "
                         "loader must be built with views_per_sample=2)")
    return images2


# ---------------------------------------------------------------------------------------------------
# the EMA hook and the loss
# ---------------------------------------------------------------------------------------------------


class ECLHook(TrainHooks):
    """Holds the re-weighting EMA (:class:`~lfme_fast.losses.ECLAccuracyEMA`) across steps and epochs.

    Its state goes into every checkpoint (``state_dict``), so a run resumed mid-epoch continues with
    exactly the EMA it had. Each epoch record gets, per ``subsets`` entry, the class means of the
    current raw class weights (``ecl_omega``) and of both accuracy EMAs (``ecl_acc_label``, ``ecl_acc_kd``).
    """

    def __init__(self, ema: ECLAccuracyEMA, subsets: Sequence[Subset], gamma: float, kappa: float):
        self.ema = ema
        self.subsets = [s for s in subsets if len(s)]
        self.gamma, self.kappa = float(gamma), float(kappa)

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> dict[str, Any]:
        acc_label, acc_kd = (a.detach().cpu() for a in self.ema.acc())
        omega = ecl_raw_class_weights(acc_label, acc_kd, self.gamma, self.kappa)

        def by_subset(x: torch.Tensor) -> dict[str, float]:
            return {s.name: float(x[torch.as_tensor(s.classes)].mean()) for s in self.subsets}

        return {"ecl_omega": by_subset(omega), "ecl_acc_label": by_subset(acc_label),
                "ecl_acc_kd": by_subset(acc_kd)}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema" not in state:
            raise ValueError("the checkpoint has no ECL EMA state (written by another recipe or version?)")
        self.ema.load_state_dict(state["ema"])


class ECLLoss:
    """``forward(model, batch)`` and ``loss_fn(batch, outputs)`` of the ECL step (see the module docstring).

    Args:
        section: the ``ecl`` config section.
        class_counts: ``(C,)`` training counts (the balanced softmax prior), on the training device.
        ema: the re-weighting EMA (None unless ``kd`` and ``reweight``).
        reduce: ``reduce(tensor) -> tensor`` summing over processes (None with one process).
    """

    def __init__(self, section: ECLConfig, class_counts: torch.Tensor, ema: ECLAccuracyEMA | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if section.kd and section.reweight and ema is None:
            raise ValueError("ecl.reweight needs the accuracy EMA")
        self.e = section
        self.counts = class_counts
        self.ema = ema
        self.reduce = reduce

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        """Both views in one forward when the contrastive branch is on (BatchNorm sees them together,
        as in BCL/NCL), else the batch's images."""
        if not self.e.contrastive:
            return model(batch.images)
        return model(torch.cat([batch.images, second_view(batch)]), with_proj=True)

    def __call__(self, batch: Any, out: Any) -> LossParts:
        e, labels = self.e, batch.labels
        b = labels.shape[0]

        def first(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, :b]

        label_logits, kd_logits = first(out.label_logits), first(out.kd_logits)
        # Read before this batch enters the EMA: a step's weights come from past batches only.
        acc_label, acc_kd = self.ema.acc() if self.ema is not None else (None, None)
        parts = ecl_loss(
            label_logits, kd_logits, first(out.features), labels, self.counts,
            proj=out.proj, proj_labels=labels.repeat(2) if out.proj is not None else None,
            acc_label=acc_label, acc_kd=acc_kd, kd=e.kd, reweight=e.reweight, feature_kd=e.feature_kd,
            contrastive=e.contrastive, lambda_kd=e.lambda_kd, lambda_feat=e.lambda_feat, lambda_con=e.lambda_con,
            temperature=e.temperature, con_temperature=e.con_temperature, gamma=e.gamma, kappa=e.kappa)
        if self.ema is not None:
            self._update_ema(label_logits, kd_logits, labels)
        return parts

    @torch.no_grad()
    def _update_ema(self, label_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor) -> None:
        probs_label = torch.softmax(label_logits.detach().float(), dim=-1)
        probs_kd = torch.softmax(kd_logits.detach().float(), dim=-1)
        stats = self.ema.batch_stats(probs_label, probs_kd, labels)
        if self.reduce is not None:  # every rank must hold the same EMA (and checkpoint it)
            stats = tuple(self.reduce(s) for s in stats)
        self.ema.update_from_stats(*stats)


# ---------------------------------------------------------------------------------------------------
# evaluation helpers
# ---------------------------------------------------------------------------------------------------


def _stacked_label_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, M * C)``: every expert's label-classifier logits side by side (one eval pass for all)."""
    out = model(images)
    m, b, c = out.label_logits.shape
    return out.label_logits.permute(1, 0, 2).reshape(b, m * c)


def _ensemble_logits(experts: Sequence[int] | None) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """``forward_fn`` for the validation curve: the mean of the selected experts' label logits."""

    def forward(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        logits = model(images).label_logits
        return (logits if experts is None else logits[list(experts)]).mean(dim=0)

    return forward


def ensemble_predictions(preds: Predictions, num_experts: int, experts: Sequence[int] | None = None
                         ) -> tuple[Predictions, list[Predictions]]:
    """Split :func:`_stacked_label_logits` predictions into the ensemble's and each expert's.

    The ensemble's logits are the mean of the selected experts' label logits (no prior), the same as
    :meth:`lfme_fast.models.MultiExpert.inference_logits`.
    """
    n = preds.logits.shape[0]
    per = preds.logits.reshape(n, num_experts, -1)
    ids = list(range(num_experts)) if experts is None else list(experts)

    def make(logits: np.ndarray) -> Predictions:
        return Predictions(preds.indices, preds.labels, logits.argmax(axis=1), logits)

    return make(per[:, ids].mean(axis=1)), [make(per[:, i]) for i in range(num_experts)]


def expert_metrics(preds: Predictions, class_counts: Sequence[int], convention: str,
                   thresholds: Sequence[int] | None) -> dict[str, Any]:
    """One expert's own top-1, overall and per subset (:func:`classification_metrics`, no per-class list)."""
    full = classification_metrics(preds, class_counts, convention, thresholds)
    return {"top1": full["top1"], "mean_class_top1": full["mean_class_top1"],
            "subsets": {name: {k: v for k, v in s.items() if k in ("top1", "top1_within_subset")}
                        for name, s in full["subsets"].items()}}


# ---------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------


class ECLRecipe(Recipe):
    """ECL end to end; see the module docstring."""

    STAGES = ("train", "eval")
    SECTIONS = {"ecl": ECLConfig}

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def train_fingerprint(self) -> str:
        return fingerprint(self.cfg, MODEL_KEYS + ECL_TRAIN_KEYS, self.ctx.model_fingerprint_extra())

    def eval_fingerprint(self, model_fp: str) -> str:
        """The base identity plus ``ecl.inference_experts`` (it changes the prediction, not the model)."""
        base = super().eval_fingerprint(model_fp)
        return fingerprint(self.cfg, ("ecl.inference_experts",), {"base": base})

    def build_model(self) -> torch.nn.Module:
        return build_multi_expert(self.cfg, self.ctx.num_classes)

    def _build(self) -> TrainParts:
        cfg, ctx, acc = self.cfg, self.ctx, self.accelerator
        e, epochs = cfg.ecl, cfg.optim.epochs
        sampler = ctx.build_sampler(cfg.train.sampler, ctx.labels(cfg.data.train_split), epochs)
        loader = ctx.train_loader(sampler, epochs, views_per_sample=2 if e.contrastive else 1)
        hook = ema = None
        if e.kd and e.reweight:
            ema = ECLAccuracyEMA(ctx.num_classes, e.num_experts, e.ema_momentum, device=ctx.device)
            subsets = split_classes(ctx.train_counts, cfg.eval.convention, cfg.eval.thresholds)
            hook = ECLHook(ema, subsets, e.gamma, e.kappa)
        reduce = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
        loss = ECLLoss(e, torch.as_tensor(ctx.train_counts, device=ctx.device), ema, reduce)
        hooks = ValAccuracyHook(self, hook, forward_fn=_ensemble_logits(e.inference_experts))
        return TrainParts(model=self.build_model(), loader=loader, loss_fn=loss, forward_fn=loss.forward, hooks=hooks)

    def stage_train(self) -> None:
        cfg = self.cfg
        self.train_stage(TrainJob("train", self.stage_dir, self.train_fingerprint, self._build,
                                  meta={"arch": cfg.model.arch, "num_classes": self.ctx.num_classes,
                                        "model": "MultiExpert", "num_experts": cfg.ecl.num_experts,
                                        "shared_stages": cfg.ecl.shared_stages}))

    def stage_eval(self) -> None:
        cfg = self.cfg
        e = cfg.ecl
        on = [name for name, flag in (("KD", e.kd), ("reweight", e.kd and e.reweight), ("feature KD", e.feature_kd),
                                      ("contrastive", e.contrastive)) if flag]
        self.eval_stage(model_dir=self.stage_dir, model_fp=self.train_fingerprint, model_stage="train",
                        recipe_info={"arch": cfg.model.arch, "epochs": cfg.optim.epochs, "sampler": cfg.train.sampler,
                                     **{k: getattr(e, k) for k in ("num_experts", "shared_stages", "kd", "reweight",
                                                                   "feature_kd", "contrastive")},
                                     "inference_experts": self._inference_ids()},
                        title=f"{cfg.name}: ECL, {e.num_experts} x {cfg.model.arch} (shared stages "
                              f"{e.shared_stages}), {cfg.train.sampler} sampling, BS" + "".join(f" + {p}" for p in on),
                        build=self.build_model)

    def _inference_ids(self) -> list[int]:
        e = self.cfg.ecl
        return list(range(e.num_experts)) if e.inference_experts is None else list(e.inference_experts)

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, Any]:
        """The ensemble's test metrics (plus a val summary) and ``metrics["ecl"]``: each expert's own
        top-1, overall and per subset. One pass over each split serves the ensemble and every expert."""
        cfg, ctx = self.cfg, self.ctx
        ev, m = cfg.eval, cfg.ecl.num_experts
        ids = self._inference_ids()

        def on(split: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            preds = predict(model, ctx.eval_loader(split), self.accelerator, keep_logits=True,
                            forward_fn=_stacked_label_logits)
            ens, experts = ensemble_predictions(preds, m, ids)
            metrics = classification_metrics(ens, ctx.train_counts, ev.convention, ev.thresholds, split=split)
            return metrics, [{"expert": i, **expert_metrics(p, ctx.train_counts, ev.convention, ev.thresholds)}
                             for i, p in enumerate(experts)]

        metrics, experts = on(cfg.data.test_split)
        metrics["ecl"] = {"inference": "mean of the label-classifier logits (no prior)", "inference_experts": ids,
                          "experts": experts}
        if cfg.data.val_split is not None and cfg.data.val_split != cfg.data.test_split:
            val, val_experts = on(cfg.data.val_split)
            metrics["val"] = {k: val[k] for k in ("split", "num_samples", "top1", "mean_class_top1", "subsets")}
            metrics["ecl"]["experts_val"] = [{"expert": x["expert"], "top1": x["top1"]} for x in val_experts]
        metrics["world_size"] = self.accelerator.num_processes
        return metrics
