"""The LFME recipe: experts -> offline expert outputs -> student -> eval (LFME, ECCV 2020).

``python lfme_fast/train.py --config configs/fmnist_lt/lfme.yaml`` runs it (registered in
``lfme_fast.recipes.RECIPES`` as ``"lfme"``; config sections ``experts`` (:class:`ExpertsConfig`)
and ``lfme`` (:class:`LFMEConfig`)). Stages:

* ``experts`` — :func:`lfme_fast.recipes.experts.train_experts` (one expert per cardinality-adjacent subset).
* ``offline`` — :mod:`lfme_fast.offline`: every expert's logits for every training sample and each of
  its ``lfme.views`` stored views, plus the SpIS confidences ``p_i``, into ``RUN/offline``. Skipped
  when a store with the same identity (data, views, experts' checkpoint hashes) is there.
* ``student`` — the student, trained with ``sum_i v_i CE_i + sum_l w_l KD_l`` (REFERENCE.md Sec. 1):

  - **KD**: per expert, on that subset's classes, temperature ``lfme.temperature``, optional ``T^2``;
    the teacher logits of a batch are read from the store by ``(batch.indices, batch.views)``: the
    student loader replays the stored views, so there is never a teacher forward pass.
  - **SpES** (``lfme.spes``): after each epoch, ``w_l = expert_weight(Acc_S, Acc_E, alpha)`` from
    validation accuracies, used in the next epoch (all 1 in the first). ``matched``: ``Acc_S`` is the
    student's top-1 on ``S_l``'s val images with its prediction restricted to ``S_l``'s classes (the
    task the expert is scored on); ``official``: the student's full-label-space top-1 on those
    images (the official code); ``off``: ``w_l = 1``.
  - **SpIS** (``lfme.spis``): ``paper``: ``v1 = clip(p_i Nbar_Smin / Nbar_Sl, 0, 1)`` grown to 1 along
    ``lfme.schedule``, multiplying each sample's CE; ``official``: per-class min-max rescaled ``p``,
    the unclamped E/2 ramp, the weight multiplying the student's *logits* (both CE and KD see them);
    ``off``. The weights come from the sampler's own pass (``initial_weights=v1``).
  - Sampling: ``train.sampler`` (``class_balanced`` with ``lfme.samples_per_class`` per class visit in
    LFME; ``instance`` for the paper's Table 3 rows).
  - Every epoch record in ``RUN/student/log.jsonl`` carries ``lfme_w`` (weights used that epoch),
    ``lfme_w_next``, ``lfme_acc_student``, ``lfme_acc_expert`` and ``lfme_v_mean`` (mean SpIS weight
    per subset that epoch), all ``{subset: value}``.
* ``eval`` — test metrics (``RUN/metrics.*``) and the plots ``RUN/spes_weights.png`` (Fig. 5) and
  ``RUN/spis_schedules.png`` (Fig. 4).

``lfme.kd: false`` with ``spes: off`` and ``spis: off`` is the plain CE student under the same sampler
(the ablation rows "instance / class-balanced sampling").

Config section ``lfme`` (:class:`LFMEConfig`): ``temperature``, ``t_squared``, ``alpha`` (SpES),
``spes`` (matched | official | off), ``spis`` (paper | official | off), ``schedule`` (linear | convex |
concave), ``kd``, ``views`` (K stored views per image, or ``all``: every distinct pad-crop view of a
28/32-px image, 162, so the student's augmentation is exactly the standard pad-crop distribution),
``view_kind`` (center | random), ``topk`` (null: dense expert logits),
``samples_per_class``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from lfme_fast.config import Check, Config, fingerprint
from lfme_fast.evaluate import subset_accuracy
from lfme_fast.recipes.base import Recipe, TrainJob, TrainParts, ValAccuracyHook
from lfme_fast.recipes.experts import ExpertsConfig, expert_subsets, load_experts, train_experts
from lfme_fast.io import atomic_write_json
from lfme_fast.logging_utils import read_jsonl
from lfme_fast.losses import LossParts, lfme_loss, weighted_cross_entropy
from lfme_fast.offline import (
    ExpertSource,
    OfflineStore,
    OfflineStoreError,
    build_views,
    eval_view_boxes,
    store_header,
    store_identity,
    write_offline,
)
from lfme_fast.schedules import (
    expert_weight,
    initial_instance_weights,
    instance_weight,
    mean_shots_per_subset,
    official_initial_weights,
    official_instance_weight,
)
from lfme_fast.subsets import Subset
from lfme_fast.trainer import MODEL_KEYS, TrainHooks

__all__ = ["LFMEConfig", "LFMERecipe", "SpESHook", "spis_initial_weights", "mean_weight_per_subset", "StudentLoss",
           "STUDENT_KEYS"]


@dataclass(frozen=True)
class LFMEConfig:
    """Config section ``lfme`` (see the module docstring)."""

    temperature: float = 2.0
    t_squared: bool = False
    alpha: float = 0.6
    spes: Literal["matched", "official", "off"] = "matched"
    spis: Literal["paper", "official", "off"] = "paper"
    schedule: Literal["linear", "convex", "concave"] = "linear"
    kd: bool = True
    views: int | Literal["all"] = 1
    view_kind: Literal["center", "random"] = "center"
    topk: int | None = None
    samples_per_class: int = 4
    fill: Literal["all", "drawn"] = "all"

    def resolve(self, cfg: Config, check: Check) -> "LFMEConfig":
        """Check ranges (no derived defaults)."""
        check(self.temperature > 0, "lfme.temperature", "must be > 0")
        check(0 <= self.alpha < 1, "lfme.alpha", f"must be in [0, 1), got {self.alpha}")
        check(self.views == "all" or self.views >= 1, "lfme.views", f"must be >= 1 or 'all', got {self.views!r}")
        check(self.topk is None or self.topk >= 1, "lfme.topk", "must be >= 1 or null")
        check(self.samples_per_class >= 1, "lfme.samples_per_class", "must be >= 1")
        # The student reads lfme.samples_per_class; a different train.samples_per_class would be ignored
        # silently, so the two must agree.
        check(cfg.train.samples_per_class == self.samples_per_class, "lfme.samples_per_class",
              f"is {self.samples_per_class} but train.samples_per_class is {cfg.train.samples_per_class}; the LFME "
              "student uses lfme.samples_per_class: set both to the same value")
        return self

#: Config keys the student depends on (besides the store's identity and the data).
STUDENT_KEYS = MODEL_KEYS + ("lfme",)
#: Stores up to this size are read into RAM (or onto the GPU) instead of memory-mapped.
IN_MEMORY_STORE_BYTES = 2 << 30


# ---------------------------------------------------------------------------------------------------
# SpIS and SpES pieces (pure functions / small objects, testable on their own)
# ---------------------------------------------------------------------------------------------------


def spis_initial_weights(kind: str, confidence: np.ndarray, labels: np.ndarray, subsets: Sequence[Subset],
                         class_counts: np.ndarray) -> np.ndarray | None:
    """Initial SpIS weights ``v1`` per training sample for ``lfme.spis`` (None when ``off``)."""
    if kind == "off":
        return None
    sub_of_class = np.full(len(class_counts), -1, dtype=np.int64)
    for l, s in enumerate(subsets):
        sub_of_class[s.classes] = l
    if (sub_of_class < 0).any():
        raise ValueError(f"class {int(np.flatnonzero(sub_of_class < 0)[0])} belongs to no expert subset")
    shots = mean_shots_per_subset(class_counts, sub_of_class)
    fn = initial_instance_weights if kind == "paper" else official_initial_weights
    return fn(confidence, labels, sub_of_class, shots)


def mean_weight_per_subset(kind: str, schedule: str, v1: np.ndarray | None, labels: np.ndarray,
                           subsets: Sequence[Subset], epoch: int, total_epochs: int) -> dict[str, float]:
    """Mean SpIS weight of each subset's training samples in ``epoch`` (1.0 everywhere when off)."""
    if v1 is None:
        return {s.name: 1.0 for s in subsets}
    if kind == "official":
        v = official_instance_weight(v1, epoch, total_epochs)
    else:
        from lfme_fast.sampling import curriculum_progress

        v = instance_weight(v1, curriculum_progress(epoch, total_epochs), schedule)
    return {s.name: float(v[np.isin(labels, s.classes)].mean()) for s in subsets}


class SpESHook(TrainHooks):
    """Self-paced expert selection: after each epoch, score the student on the val split and set the
    next epoch's ``w_l`` (all 1 in the first epoch). Also logs the epoch's mean SpIS weights.

    Args:
        mode: ``matched`` | ``official`` | ``off``.
        alpha: SpES threshold.
        subsets: the experts' subsets (many -> few).
        expert_acc: each expert's val top-1 on its subset (fraction), or None (then ``w_l`` stays 1).
        predict_val: ``predict_val(model) -> (logits (N, C), labels (N,))`` on the val split (a
            collective: called on every process).
        v_means: ``v_means(epoch) -> {subset: mean v}``.
    """

    def __init__(self, mode: str, alpha: float, subsets: Sequence[Subset], expert_acc: Sequence[float | None],
                 predict_val: Any, v_means: Any):
        if mode not in ("matched", "official", "off"):
            raise ValueError(f"lfme.spes must be matched, official or off, got {mode!r}")
        self.mode, self.alpha = mode, float(alpha)
        self.subsets = list(subsets)
        self.expert_acc = list(expert_acc)
        self.predict_val = predict_val
        self.v_means = v_means
        self.weights = [1.0] * len(self.subsets)

    def student_accuracies(self, logits: Any, labels: Any) -> list[float]:
        """``Acc_S`` per subset under this hook's mode (fractions; nan without val images)."""
        logits = torch.as_tensor(logits)
        labels = torch.as_tensor(labels).long()
        out = []
        for s in self.subsets:
            if self.mode == "official":
                mask = torch.isin(labels, torch.as_tensor(s.classes))
                out.append(float((logits[mask].argmax(1) == labels[mask]).float().mean()) if mask.any() else math.nan)
            else:
                out.append(subset_accuracy(logits, labels, s.classes))
        return out

    def update(self, student_acc: Sequence[float]) -> list[float]:
        """The next weights from student accuracies (``expert_weight`` per expert)."""
        new = []
        for acc_s, acc_e in zip(student_acc, self.expert_acc):
            if acc_e is None or acc_s is None or math.isnan(acc_s):
                new.append(1.0)
            else:
                new.append(expert_weight(acc_s, acc_e, self.alpha))
        return new

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> dict[str, Any]:
        names = [s.name for s in self.subsets]
        rec: dict[str, Any] = {"lfme_w": dict(zip(names, self.weights)), "lfme_v_mean": self.v_means(epoch)}
        if self.mode != "off":
            logits, labels = self.predict_val(model)
            acc_s = self.student_accuracies(logits, labels)
            self.weights = self.update(acc_s)
            rec["lfme_acc_student"] = dict(zip(names, acc_s))
            rec["lfme_acc_expert"] = dict(zip(names, self.expert_acc))
        rec["lfme_w_next"] = dict(zip(names, self.weights))
        return rec

    def state_dict(self) -> dict[str, Any]:
        return {"weights": list(self.weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" in state:
            self.weights = [float(w) for w in state["weights"]]


class StudentLoss:
    """``loss_fn(batch, logits)`` and ``forward_fn(model, batch)`` of the student.

    Teacher logits come from ``store`` by ``(batch.indices, batch.views)``; ``weights()`` returns the
    current SpES weights (a :class:`SpESHook`'s list, read at every step).
    """

    def __init__(self, store: OfflineStore | None, subsets: Sequence[Subset], spis: str, kd: bool,
                 temperature: float, t_squared: bool, weights: Any, device: Any):
        self.store, self.spis, self.kd = store, spis, kd
        self.temperature, self.t_squared = float(temperature), bool(t_squared)
        self.weights = weights
        self.device = torch.device(device)
        self.subset_idx = [torch.as_tensor(s.classes, dtype=torch.long, device=self.device) for s in subsets]
        if kd and store is None:
            raise ValueError("lfme.kd=true needs the offline store")

    def forward(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        logits = model(batch.images)
        if self.spis == "official":
            # The official code multiplies the student's logits by the instance weight (REFERENCE.md).
            logits = logits * batch.weights.to(logits.dtype)[:, None]
        return logits

    def __call__(self, batch: Any, logits: torch.Tensor) -> LossParts:
        ce_w = batch.weights if self.spis == "paper" else None
        if not self.kd:
            return weighted_cross_entropy(logits, batch.labels, ce_w)
        teachers = self.store.teachers(batch.indices, batch.views, self.device)
        return lfme_loss(logits, batch.labels, ce_w, teachers, self.subset_idx, list(self.weights()),
                         self.temperature, self.t_squared)


# ---------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------


class LFMERecipe(Recipe):
    """LFME end to end; see the module docstring."""

    STAGES = ("experts", "offline", "student", "eval")
    SECTIONS = {"experts": ExpertsConfig, "lfme": LFMEConfig}

    def setup(self) -> None:
        super().setup()
        f = self.cfg.lfme
        if f.spes != "off" and f.kd and self.cfg.data.val_split is None:
            raise ValueError("lfme.spes needs a validation split (data.val_split), or set lfme.spes=off")
        self.subsets = expert_subsets(self.cfg, self.ctx.train_counts)

    # ---- paths and identities ------------------------------------------------------------------
    @property
    def student_dir(self) -> Path:
        return self.run_dir / "student"

    @property
    def model_path(self) -> Path:
        return self.student_dir / "model.pt"

    def _geometry(self) -> tuple[str, int, np.ndarray, np.ndarray]:
        """(augmentation mode, resolution, heights, widths) of the training split, as the loaders resolve them."""
        from lfme_fast.loaders.base import resolve_spec

        spec = resolve_spec(self.ctx.loader_options(self.cfg.data.train_split, train=False, batch_size=1))
        return spec.mode, spec.resolution, spec.heights, spec.widths

    def _expert_sources(self, with_models: bool) -> list[ExpertSource]:
        models = load_experts(self.run_dir, self.cfg, self.ctx.train_counts, self.ctx.device) if with_models else None
        out = []
        for k, s in enumerate(self.subsets):
            model = None
            if models is not None:
                model = models[k][1]
                if self.ctx.channels_last:
                    model = model.to(memory_format=torch.channels_last)
            path = self.run_dir / "experts" / s.name / "model.pt"
            if not path.exists():
                raise FileNotFoundError(f"expert {s.name!r} not found at {path}: run the 'experts' stage first")
            out.append(ExpertSource(s.name, s.classes, model, path))
        return out

    def expected_header(self) -> dict[str, Any]:
        """The store identity this run needs (data, views, experts)."""
        f = self.cfg.lfme
        mode, res, _, _ = self._geometry()
        return store_header(run_dir=self.run_dir, manifest=self.ctx.manifest, split=self.cfg.data.train_split,
                            resolution=res, mode=mode, num_views=f.views, view_seed=self.cfg.seed,
                            view_kind=f.view_kind, experts=self._expert_sources(False), topk=f.topk,
                            backend=self.cfg.data.backend,
                            fill=self.fill_identity(f.fill, self.cfg.train.sampler, samples_per_class=f.samples_per_class))

    def student_fingerprint(self, header: dict[str, Any]) -> str:
        store_id = store_identity(header)
        return fingerprint(self.cfg, STUDENT_KEYS, {**self.ctx.model_fingerprint_extra(), "store": store_id})

    # ---- stages ----------------------------------------------------------------------------------
    def stage_experts(self) -> None:
        infos = train_experts(self)
        for i in infos:
            self.console(f"expert {i.subset.name}: val top-1 within subset {i.metrics.get('val_top1')}")

    def stage_offline(self) -> None:
        header = self.expected_header()
        mode, _, heights, widths = self._geometry()
        f = self.cfg.lfme
        views = build_views(heights, widths, f.views, self.cfg.seed, f.view_kind, mode)

        @functools.cache  # a stale store's check and the rebuild need the same plan: draw it once
        def draws():
            # The student's indices do not depend on the SpIS weights (tests/test_sampling.py,
            # test_curriculum_weights_do_not_change_the_order), so its draws are known before the
            # store's confidences exist.
            return self.student_draws(self._build_sampler(self.ctx.labels(self.cfg.data.train_split), None), views)

        if self.offline_up_to_date(header, OfflineStore, draws if f.fill == "drawn" else None):
            return
        drawn = draws() if f.fill == "drawn" else None
        write_offline(self.run_dir, header, self._expert_sources(True), views, self.offline_loader,
                      self.ctx.num_classes,
                      eval_views=eval_view_boxes(heights, widths, mode) if f.view_kind == "random" else None,
                      accelerator=self.accelerator, log=self.console,
                      show_progress=self.cfg.log.progress, drawn=drawn)

    def _open_store(self, header: dict[str, Any]) -> OfflineStore:
        try:
            store = OfflineStore.open(self.run_dir, header)
        except OfflineStoreError as exc:
            raise OfflineStoreError(f"{exc}. Run the 'offline' stage first.") from None
        total = int(store.header["storage"].get("total_bytes", 0))
        if total <= IN_MEMORY_STORE_BYTES:
            load = str(self.ctx.device) if self.ctx.device.type == "cuda" else "ram"
            store = OfflineStore.open(self.run_dir, header, load=load)
        return store

    def _expert_val_acc(self) -> list[float | None]:
        out = []
        for s in self.subsets:
            path = self.run_dir / "experts" / s.name / "metrics.json"
            out.append(json.loads(path.read_text()).get("val_top1") if path.exists() else None)
        return out

    def _build_sampler(self, labels: np.ndarray, v1: np.ndarray | None) -> Any:
        """``train.sampler`` with LFME's samples per class visit and the SpIS curriculum weights."""
        kind = self.cfg.train.sampler
        if kind not in ("class_balanced", "instance", "sqrt"):
            raise ValueError(f"train.sampler={kind!r} is not supported by the lfme recipe (class_balanced, instance, "
                             "sqrt)")
        f = self.cfg.lfme
        return self.ctx.build_sampler(kind, labels, self.cfg.optim.epochs, samples_per_class=f.samples_per_class,
                                      initial_weights=v1, schedule="official" if f.spis == "official" else f.schedule)

    def stage_student(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        f = cfg.lfme
        header = self.expected_header()
        state: dict[str, Any] = {}

        def build() -> TrainParts:
            # Every variant (KD or not) trains on the store's views, so ablation rows differ only in the loss.
            store = self._open_store(header)
            epochs = cfg.optim.epochs
            labels = ctx.labels(cfg.data.train_split)
            v1 = spis_initial_weights(f.spis, store.confidence, labels, self.subsets, ctx.train_counts)
            loader = ctx.train_loader(self._build_sampler(labels, v1), epochs, views=store.views)

            val_hook = ValAccuracyHook(self)

            def predict_val(model):  # the val pass of val_hook: one per epoch for both hooks
                preds = val_hook.val_predictions(model)
                return preds.logits, preds.labels

            hook = SpESHook(f.spes if f.kd else "off", f.alpha, self.subsets, self._expert_val_acc(), predict_val,
                            lambda e: mean_weight_per_subset(f.spis, f.schedule, v1, labels, self.subsets, e, epochs))
            state["hook"] = hook
            val_hook.inner = hook
            loss = StudentLoss(store, self.subsets, f.spis, f.kd, f.temperature, f.t_squared, lambda: hook.weights,
                               ctx.device)
            return TrainParts(model=ctx.build_model(ctx.num_classes), loader=loader, loss_fn=loss,
                              forward_fn=loss.forward, hooks=val_hook)

        self.train_stage(TrainJob("student", self.student_dir, self.student_fingerprint(header), build,
                                  meta={"arch": cfg.model.arch, "num_classes": ctx.num_classes},
                                  final_meta=lambda _: {"final_spes_weights": state["hook"].weights}))

    def stage_eval(self) -> None:
        cfg = self.cfg
        f = cfg.lfme
        parts = "+".join(p for p, on in (("KD", f.kd), (f"SpES({f.spes})", f.kd and f.spes != "off"),
                                          (f"SpIS({f.spis},{f.schedule})", f.spis != "off")) if on) or "CE"
        self.eval_stage(model_dir=self.student_dir, model_fp=self.student_fingerprint(self.expected_header()),
                        model_stage="student",
                        recipe_info={"arch": cfg.model.arch, "epochs": cfg.optim.epochs, "sampler": cfg.train.sampler,
                                     "kd": f.kd, "spes": f.spes, "spis": f.spis, "schedule": f.schedule,
                                     "alpha": f.alpha, "temperature": f.temperature, "t_squared": f.t_squared,
                                     "views": f.views, "view_kind": f.view_kind, "topk": f.topk},
                        title=f"{cfg.name}: LFME student {cfg.model.arch}, {cfg.train.sampler} sampling, {parts}",
                        add=self._lfme_summary)

    def _lfme_summary(self, metrics: dict[str, Any]) -> None:
        """``metrics["lfme"]`` (SpES weights, plots, store bytes) and ``RUN/lfme_summary.json``; the plots."""
        from lfme_fast.plots import plot_run

        records = read_jsonl(self.student_dir / "log.jsonl")
        plots = []
        if self.accelerator.is_main_process:
            plots = [p.name for p in plot_run(self.run_dir, records, self.cfg.lfme.schedule, self.cfg.name)]
        epochs = [r for r in records if r.get("event") == "epoch"]
        metrics["lfme"] = {"spes_weights_last_epoch": epochs[-1].get("lfme_w") if epochs else None,
                           "spes_weights_next": epochs[-1].get("lfme_w_next") if epochs else None,
                           "plots": plots}
        header = self.run_dir / "offline" / "header.json"
        if header.exists():
            st = json.loads(header.read_text())["storage"]
            metrics["lfme"]["offline_bytes_per_image"] = st.get("logit_bytes_per_image")
        if self.accelerator.is_main_process:
            atomic_write_json(self.run_dir / "lfme_summary.json", metrics["lfme"])
