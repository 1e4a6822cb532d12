"""The CBD recipe: teachers -> offline teacher features -> class-balanced student -> eval
(Class-Balanced Distillation, Iscen et al. 2021; REFERENCE.md Sec. 1 "CBD").

``python lfme_fast/train.py --config configs/fmnist_lt/cbd_ens.yaml`` runs it (registered in
``lfme_fast.recipes.RECIPES`` as ``"cbd"``; config section ``cbd``, :class:`CBDConfig`). Stages:

* ``teachers`` — one model per entry of ``cbd.teachers`` (``{seed, augment}``), each its own stage
  in ``RUN/teachers/t<k>/`` (fingerprint, skip, resume: :meth:`Recipe.train_stage`). Instance
  sampling (one epoch = every training image once), ``optim``'s SGD and cosine schedule, CE on the
  ``model`` section's classifier (CBD configs: the cosine classifier). The record's seed fixes the
  teacher's model init, sampler order and augmentation draws (all from ``seed + 1000 * (record seed
  + 1)``, so teachers differ from each other and from the student, and another run seed gives other
  teachers). ``augment: standard`` is the dataset's training augmentation (RandomResizedCrop + flip,
  or pad-crop + flip for 28/32-px data); ``augment: strong`` adds SimCLR colour jitter (strength 1,
  p 0.8) and random grayscale (p 0.2), planned and replayable like the crops (``LoaderOptions(colour=
  'simclr')``).
* ``offline`` — one pass per stored view over the training set writes every teacher's L2-normalised
  penultimate features (``forward_features``) into the generic store (:mod:`lfme_fast.offline`):
  ``RUN/offline/teacher<k>.features.npy``, ``[N, K, D_t]`` float16 (``cbd.feature_dtype``),
  memory-mapped. The header pins the teachers' checkpoints (sha256), the data, the views, the loader
  back end and the teacher set; the bytes per image are printed and recorded (header ``storage``,
  ``metrics.json``). Skipped when a store with the same identity is there; an interrupted pass resumes.
* ``student`` — ``train.sampler`` (class-balanced, ``cbd.samples_per_class`` images per class visit)
  over the store's views: the loader replays exactly the view the features were computed on
  (``views=store.views``; ``batch.views`` selects the stored row), so no teacher runs during training.
  Loss (:func:`lfme_fast.losses.cbd_feature_loss`)::

      (1 - alpha) CE(logits, y) + alpha * beta * (1 - cos(g(f_s), concat_k f_t,k))

  with ``g`` = Linear(student width -> concatenated teacher width) + ReLU (``cbd.projection``; the
  identity when false, which needs equal widths). The student is one module, :class:`CBDStudent`
  (backbone + ``g``), so ``RUN/student/model.pt`` holds both.
* ``eval`` — the student's test metrics (``RUN/metrics.*``) plus ``metrics["cbd"]``: each teacher's
  own test top-1 (overall and per subset) and the store's bytes per image.

Layout::

    RUN/teachers/t<k>/   model.pt, log.jsonl, done.json (checkpoints/ while training)
    RUN/offline/         header.json, views.npz, teacher<k>.features.npy  [N, K, D_t] float16
    RUN/student/         model.pt (backbone + projection), log.jsonl (ce, cos_distance, feat per step)
    RUN/metrics.{json,md}, RUN/per_class_accuracy.png

Exact vs the official code: the official TensorFlow code runs the teachers online on the student's
augmented batch and only approximates class-balanced sampling in tf.data; here the sampling is exact
(:class:`lfme_fast.sampling.ClassBalancedSampler`) and the teachers' features are exact for the
stored views (to float16 rounding). The student's augmentation is restricted to those ``K`` views
per image (``cbd.views: all`` on 28/32-px data stores all 162 pad-crop views, so it is then exactly
the standard pad-crop distribution).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfme_fast.config import Check, Config, ConfigError, OptimConfig, fingerprint
from lfme_fast.losses import LossParts, cbd_feature_loss, weighted_cross_entropy
from lfme_fast.offline import (
    ArraySpec,
    ArrayStore,
    OfflineStoreError,
    build_views,
    make_header,
    store_identity,
    view_identity,
    write_store,
)
from lfme_fast.recipes.base import Recipe, TrainJob, TrainParts, ValAccuracyHook
from lfme_fast.trainer import MODEL_KEYS

__all__ = ["TeacherConfig", "CBDConfig", "CBDRecipe", "CBDStudent", "CBDLoss", "Teacher", "feature_array",
           "feature_width", "teacher_producer", "TEACHER_KEYS", "STUDENT_KEYS", "AUGMENTS"]

#: ``augment`` of a teacher record -> the loader's colour settings (crops are the dataset's own
#: training augmentation either way). ``strong``: SimCLR colour jitter at strength 1 + grayscale.
AUGMENTS: dict[str, dict[str, Any]] = {
    "standard": {"colour": "none", "colour_strength": 1.0},
    "strong": {"colour": "simclr", "colour_strength": 1.0},
}
#: Stores up to this size are read into RAM (or onto the GPU) instead of memory-mapped.
IN_MEMORY_STORE_BYTES = 2 << 30
#: Seed stride between teachers (as the LFME experts' ``1000 * (k + 1)``).
TEACHER_SEED_STRIDE = 1000
RECIPE_NAME = "cbd"


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher of ``cbd.teachers``: its seed and its augmentation (``standard`` | ``strong``)."""

    seed: int = 0
    augment: Literal["standard", "strong"] = "standard"


#: The official CBD-ENS teacher set: 2 standard + 2 strong ("data-aug") teachers.
DEFAULT_TEACHERS = (TeacherConfig(0, "standard"), TeacherConfig(1, "standard"),
                    TeacherConfig(2, "strong"), TeacherConfig(3, "strong"))


def feature_width(arch: str, kwargs: dict[str, Any] | None = None) -> int:
    """The penultimate width (``feature_dim``) of architecture ``arch``, without allocating weights."""
    from lfme_fast.models import build_model

    with torch.device("meta"):
        return int(build_model(arch, 2, **dict(kwargs or {})).feature_dim)


@dataclass(frozen=True)
class CBDConfig:
    """Config section ``cbd``.

    Teachers: ``teachers`` (list of ``{seed, augment}``; default the official CBD-ENS set),
    ``epochs``/``lr``/``batch_size``/``arch`` (null: ``optim.epochs``/``optim.lr``/``data.batch_size``/
    ``model.arch``), ``global_batch_size`` (the teachers' batch for all processes together; the
    per-process batch is ``global / (world size x train.grad_accum)``; at most one of ``batch_size`` /
    ``global_batch_size``; both null: ``data``'s form and value), ``sampler`` (instance). Student:
    ``alpha`` (CE weight ``1 - alpha``), ``beta`` (feature-term scale), ``projection`` (``g`` = Linear +
    ReLU to the concatenated teacher width; false = identity, only when the widths match), ``samples_per_class`` (class-balanced visit size).
    Store: ``views`` (stored views per image, or ``all`` pad-crop views), ``feature_dtype``, ``fill``
    (``all`` rows, or only the rows the student will ``drawn``: see :mod:`lfme_fast.offline`).
    """

    teachers: tuple[TeacherConfig, ...] = DEFAULT_TEACHERS
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    global_batch_size: int | None = None
    arch: str | None = None
    sampler: Literal["instance"] = "instance"
    alpha: float = 0.4
    beta: float = 100.0
    projection: bool = True
    views: int | Literal["all"] = 1
    feature_dtype: Literal["float16", "float32"] = "float16"
    samples_per_class: int = 4
    fill: Literal["all", "drawn"] = "all"

    def resolve(self, cfg: Config, check: Check) -> "CBDConfig":
        """Check values and the widths; unset teacher settings inherit ``optim``/``data``/``model``."""
        self._check_teachers(check)
        check(0.0 <= self.alpha <= 1.0, "cbd.alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.beta >= 0 and math.isfinite(self.beta), "cbd.beta", f"must be a finite number >= 0, got {self.beta}")
        check(self.epochs is None or self.epochs >= 1, "cbd.epochs", "must be >= 1 or null")
        check(self.lr is None or self.lr > 0, "cbd.lr", "must be > 0 or null")
        check(self.batch_size is None or self.batch_size >= 1, "cbd.batch_size", "must be >= 1 or null")
        check(self.global_batch_size is None or self.global_batch_size >= 1, "cbd.global_batch_size",
              "must be >= 1 or null")
        check(self.batch_size is None or self.global_batch_size is None, "cbd.global_batch_size",
              f"is {self.global_batch_size} but cbd.batch_size is {self.batch_size} too: give the teachers' batch "
              "per process or for all processes, not both; set the other to null")
        batch, global_batch = self.batch_size, self.global_batch_size
        if batch is None and global_batch is None:  # inherit data's form and value
            batch, global_batch = cfg.data.batch_size, cfg.data.global_batch_size
        check(self.views == "all" or self.views >= 1, "cbd.views", f"must be >= 1 or 'all', got {self.views!r}")
        check(self.samples_per_class >= 1, "cbd.samples_per_class", "must be >= 1")
        # The student reads cbd.samples_per_class; a different train.samples_per_class would be ignored
        # silently, so the two must agree.
        check(cfg.train.samples_per_class == self.samples_per_class, "cbd.samples_per_class",
              f"is {self.samples_per_class} but train.samples_per_class is {cfg.train.samples_per_class}; the CBD "
              "student uses cbd.samples_per_class: set both to the same value")
        check(cfg.optim.schedule == "cosine", "optim.schedule",
              f"CBD trains its teachers and its student with a cosine schedule, got {cfg.optim.schedule!r}")
        check(cfg.train.loss == "ce", "train.loss", f"CBD's loss is (1 - alpha) CE + feature term; set ce, got "
                                                    f"{cfg.train.loss!r}")
        check(cfg.train.sampler in STUDENT_SAMPLERS, "train.sampler",
              f"the CBD student samples with one of {STUDENT_SAMPLERS}, got {cfg.train.sampler!r}")
        resolved = dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else cfg.optim.epochs,
            lr=self.lr if self.lr is not None else cfg.optim.lr,
            batch_size=batch, global_batch_size=global_batch,
            arch=self.arch if self.arch is not None else cfg.model.arch,
        )
        resolved._check_widths(cfg, check)
        return resolved

    def _check_teachers(self, check: Check) -> None:
        check(len(self.teachers) >= 1, "cbd.teachers",
              "needs at least one teacher, e.g. [{seed: 0, augment: standard}]")
        seen: dict[tuple[int, str], int] = {}
        for i, t in enumerate(self.teachers):
            check(t.seed >= 0, f"cbd.teachers[{i}].seed", f"must be >= 0, got {t.seed}")
            first = seen.setdefault((t.seed, t.augment), i)
            check(first == i, f"cbd.teachers[{i}]",
                  f"repeats cbd.teachers[{first}] ({{seed: {t.seed}, augment: {t.augment}}}): the same teacher twice")

    def _check_widths(self, cfg: Config, check: Check) -> None:
        from lfme_fast.models import MODELS

        check(self.arch in MODELS, "cbd.arch", f"unknown architecture {self.arch!r}; known: {sorted(MODELS)}")
        try:
            student, teacher = feature_width(cfg.model.arch, cfg.model.kwargs), feature_width(self.arch,
                                                                                             cfg.model.kwargs)
        except (TypeError, ValueError) as exc:
            raise check.fail("model.kwargs", f"cannot build {cfg.model.arch}/{self.arch} with them ({exc})") from None
        total = teacher * len(self.teachers)
        check(self.projection or student == total, "cbd.projection",
              f"false needs the student's feature width ({student}, model.arch={cfg.model.arch}) to equal the "
              f"concatenated teachers' width ({len(self.teachers)} x {teacher} = {total}, cbd.arch={self.arch}); "
              "set cbd.projection: true (a Linear + ReLU to that width)")


#: Student samplers CBD accepts (class_balanced is CBD's; the others for ablations).
STUDENT_SAMPLERS = ("class_balanced", "instance", "sqrt")
#: Config keys a teacher depends on (besides its record, the data and the process count): the model
#: keys minus the student's sampler/loss/batch/epochs/lr and minus ``model.arch`` (``cbd.*`` resolved
#: values count instead).
_STUDENT_ONLY = {"data.batch_size", "model", "optim", "train.sampler", "train.samples_per_class",
                 "train.epoch_samples", "train.loss", "train.tau"}
TEACHER_KEYS = tuple(k for k in MODEL_KEYS if k not in _STUDENT_ONLY) + tuple(
    f"optim.{f.name}" for f in dataclasses.fields(OptimConfig) if f.name not in ("epochs", "lr")) + (
    "model.pretrained", "model.kwargs", "model.classifier", "model.cosine_scale",
    "cbd.epochs", "cbd.lr", "cbd.batch_size", "cbd.arch", "cbd.sampler")
#: Config keys the student depends on besides the store's identity (teachers, views, dtype) and the data.
STUDENT_KEYS = MODEL_KEYS + ("cbd.alpha", "cbd.beta", "cbd.projection", "cbd.samples_per_class")


# ---------------------------------------------------------------------------------------------------
# student model, loss and the offline producer
# ---------------------------------------------------------------------------------------------------


def feature_array(k: int) -> str:
    """Name of teacher ``k``'s feature array in the store."""
    return f"teacher{k}.features"


class CBDStudent(nn.Module):
    """The CBD student: a backbone (with its classifier) and the projection ``g``, in one module.

    ``forward(x)`` gives the logits (evaluation, ``predict``); ``forward(x, with_features=True)`` gives
    ``(logits, g(f_s))``, where ``f_s`` is the backbone's pooled penultimate feature. Training always
    asks for both, so every parameter takes part in every step (DDP needs no unused-parameter search).

    Args:
        backbone: a model with ``forward_features``, ``classifier`` and ``feature_dim``.
        teacher_width: width of the concatenated teacher features.
        projection: ``g`` = Linear(feature_dim -> teacher_width) + ReLU; False = identity (widths must match).
    """

    def __init__(self, backbone: nn.Module, teacher_width: int, projection: bool = True):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(backbone.feature_dim)
        self.teacher_width = int(teacher_width)
        if projection:
            self.projection: nn.Module = nn.Sequential(nn.Linear(self.feature_dim, self.teacher_width), nn.ReLU())
        elif self.feature_dim != self.teacher_width:
            raise ValueError(f"projection=False needs the student's feature width ({self.feature_dim}) to equal the "
                             f"teachers' concatenated width ({self.teacher_width})")
        else:
            self.projection = nn.Identity()

    def forward(self, x: torch.Tensor, with_features: bool = False) -> Any:
        f = self.backbone.forward_features(x)
        logits = self.backbone.classifier(f)
        return (logits, self.projection(f)) if with_features else logits


class CBDLoss:
    """``forward_fn(model, batch)`` and ``loss_fn(batch, outputs)`` of the CBD student.

    The teachers' features for the batch are read from ``store`` by ``(batch.indices, batch.views)``
    and concatenated in teacher order; :func:`lfme_fast.losses.cbd_feature_loss` normalises the
    concatenation (as the official code does) and the projected student feature.
    """

    def __init__(self, store: ArrayStore, num_teachers: int, alpha: float, beta: float, device: Any):
        self.store = store
        self.names = [feature_array(k) for k in range(int(num_teachers))]
        self.alpha, self.beta = float(alpha), float(beta)
        self.device = torch.device(device)

    @staticmethod
    def forward(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch.images, with_features=True)

    def teacher_features(self, indices: Any, views: Any) -> torch.Tensor:
        """The concatenated stored teacher features ``(B, sum_k D_k)`` (stored dtype) of a batch."""
        rows = self.store.rows(indices, views)
        return torch.cat([self.store.gather(n, rows=rows, device=self.device) for n in self.names], dim=1)

    def __call__(self, batch: Any, outputs: tuple[torch.Tensor, torch.Tensor]) -> LossParts:
        logits, projected = outputs
        ce = weighted_cross_entropy(logits, batch.labels)
        return cbd_feature_loss(projected, self.teacher_features(batch.indices, batch.views), self.alpha, self.beta,
                                ce=ce.loss)


def teacher_producer(models: Sequence[nn.Module]) -> Any:
    """The offline producer: ``teacher<k>.features`` = L2-normalised ``forward_features`` of teacher k."""

    def produce(batch: Any) -> dict[str, torch.Tensor]:
        return {feature_array(k): F.normalize(m.forward_features(batch.images).float(), dim=1)
                for k, m in enumerate(models)}

    return produce


# ---------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teacher:
    """One configured teacher: position ``k``, its record, effective seed, folder and fingerprint."""

    k: int
    record: TeacherConfig
    seed: int
    stage_dir: Path
    fingerprint: str

    @property
    def name(self) -> str:
        return f"t{self.k}"

    @property
    def model_path(self) -> Path:
        return self.stage_dir / "model.pt"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.record.seed, "augment": self.record.augment}


class CBDRecipe(Recipe):
    """CBD / CBD-ENS end to end; see the module docstring."""

    STAGES = ("teachers", "offline", "student", "eval")
    SECTIONS = {"cbd": CBDConfig}

    def setup(self) -> None:
        super().setup()
        f = self.cfg.cbd
        extra = self.ctx.model_fingerprint_extra()
        self.teachers = [
            Teacher(k, rec, self.cfg.seed + TEACHER_SEED_STRIDE * (rec.seed + 1), self.run_dir / "teachers" / f"t{k}",
                    fingerprint(self.cfg, TEACHER_KEYS, {**extra, "teacher": dataclasses.asdict(rec)}))
            for k, rec in enumerate(f.teachers)]
        self.teacher_width = feature_width(f.arch, self.cfg.model.kwargs)
        self._view_identity(self._geometry()[0])  # 'all' on a non-pad-crop dataset fails now, not after the teachers

    # ---- paths and identities ------------------------------------------------------------------
    @property
    def student_dir(self) -> Path:
        return self.run_dir / "student"

    @property
    def total_teacher_width(self) -> int:
        return self.teacher_width * len(self.teachers)

    def _geometry(self) -> tuple[str, int, np.ndarray, np.ndarray]:
        """(augmentation mode, resolution, heights, widths) of the training split, as the loaders resolve them."""
        from lfme_fast.loaders.base import resolve_spec

        spec = resolve_spec(self.ctx.loader_options(self.cfg.data.train_split, train=False, batch_size=1))
        return spec.mode, spec.resolution, spec.heights, spec.widths

    def _view_identity(self, mode: str) -> dict[str, Any]:
        try:
            return view_identity(mode, self.cfg.cbd.views, self.cfg.seed, "center")
        except ValueError as exc:
            raise ConfigError(f"cbd.views: {exc}") from None

    def expected_header(self) -> dict[str, Any]:
        """The store identity this run needs: data, views, back end, the teachers' checkpoints and records."""
        cfg = self.cfg
        for t in self.teachers:
            if not t.model_path.exists():
                raise FileNotFoundError(f"teacher {t.name} ({t.record}) not found at {t.model_path}: run the "
                                        "'teachers' stage first")
        mode, res, _, _ = self._geometry()
        fields = {"teachers": [{**t.to_json(), "arch": cfg.cbd.arch, "feature_dim": self.teacher_width}
                               for t in self.teachers],
                  "features": "L2-normalised forward_features (pooled penultimate)"}
        return make_header(run_dir=self.run_dir, manifest=self.ctx.manifest, split=cfg.data.train_split,
                           views={**self._view_identity(mode),
                                  **self.fill_identity(cfg.cbd.fill, cfg.train.sampler,
                                                       samples_per_class=cfg.cbd.samples_per_class)},
                           augmentation={"resolution": int(res), "mode": mode},
                           backend=cfg.data.backend, checkpoints=[(t.name, t.model_path) for t in self.teachers],
                           recipe=RECIPE_NAME, fields=fields,
                           arrays=[ArraySpec(feature_array(t.k), self.teacher_width, cfg.cbd.feature_dtype)
                                   for t in self.teachers])

    def student_fingerprint(self, header: dict[str, Any]) -> str:
        return fingerprint(self.cfg, STUDENT_KEYS, {**self.ctx.model_fingerprint_extra(),
                                                    "store": store_identity(header)})

    # ---- teachers ------------------------------------------------------------------------------
    def teacher_loader_options(self, teacher: Teacher, sampler: Any = None) -> Any:
        """The :class:`LoaderOptions` of ``teacher``'s training loader: its batch size, its seed for the
        augmentation draws, colour jitter for ``strong`` teachers."""
        f = self.cfg.cbd
        opts = self.ctx.loader_options(self.cfg.data.train_split, train=True, batch_size=f.batch_size,
                                       sampler=sampler, total_epochs=f.epochs, **AUGMENTS[teacher.record.augment])
        return opts.replace(seed=teacher.seed)

    def build_teacher(self, teacher: Teacher) -> nn.Module:
        """A freshly initialised teacher (``model`` section, ``cbd.arch``, the teacher's seed)."""
        return self.ctx.build_model(self.ctx.num_classes, self.cfg.cbd.arch, seed_offset=teacher.seed - self.cfg.seed)

    def _teacher_job(self, teacher: Teacher) -> TrainJob:
        from lfme_fast.loaders import build_loader

        ctx, f = self.ctx, self.cfg.cbd

        def build() -> TrainParts:
            # one teacher epoch = every training image once (train.epoch_samples is the student's)
            sampler = ctx.build_sampler(f.sampler, ctx.labels(self.cfg.data.train_split), f.epochs,
                                        seed_offset=teacher.seed - self.cfg.seed, num_samples=None)
            return TrainParts(model=self.build_teacher(teacher),
                              loader=build_loader(self.teacher_loader_options(teacher, sampler)),
                              loss_fn=lambda batch, logits: weighted_cross_entropy(logits, batch.labels),
                              epochs=f.epochs, lr=f.lr, hooks=ValAccuracyHook(self))

        meta = {"arch": f.arch, "num_classes": ctx.num_classes, "model_kwargs": dict(self.cfg.model.kwargs),
                "classifier": self.cfg.model.classifier, "teacher": teacher.to_json(), "seed": teacher.seed}
        return TrainJob(f"teacher-{teacher.name}", teacher.stage_dir, teacher.fingerprint, build, meta=meta)

    def load_teacher(self, teacher: Teacher) -> nn.Module:
        """Teacher ``teacher``'s trained model, in eval mode on the run's device."""
        model = self.load_stage_model(teacher.stage_dir, teacher.fingerprint, lambda: self.build_teacher(teacher),
                                      "teachers")
        model = model.to(self.ctx.device).eval()
        return model.to(memory_format=torch.channels_last) if self.ctx.channels_last else model

    def stage_teachers(self) -> None:
        for t in self.teachers:
            self.train_stage(self._teacher_job(t))

    # ---- offline -------------------------------------------------------------------------------
    def stage_offline(self) -> None:
        header = self.expected_header()
        cfg = self.cfg
        mode, _, heights, widths = self._geometry()
        views = build_views(heights, widths, cfg.cbd.views, cfg.seed, "center", mode)

        @functools.cache  # a stale store's check and the rebuild need the same plan: draw it once
        def draws():
            return self.student_draws(self._student_sampler(), views)

        if self.offline_up_to_date(header, draws=draws if cfg.cbd.fill == "drawn" else None):
            return
        drawn = draws() if cfg.cbd.fill == "drawn" else None
        per_image = self._feature_bytes(header)
        producer = teacher_producer([self.load_teacher(t) for t in self.teachers])
        store = write_store(self.run_dir, header, views, producer, self.offline_loader, accelerator=self.accelerator,
                            log=self.console, show_progress=cfg.log.progress,
                            storage_extra={"feature_bytes_per_image": per_image}, drawn=drawn)
        n = store.num_samples
        self.console(f"offline: {len(self.teachers)} teacher(s) x {store.num_views} view(s) x {self.teacher_width} "
                     f"dims x {np.dtype(cfg.cbd.feature_dtype).itemsize} B = {per_image} bytes per image "
                     f"({per_image * n / 2 ** 20:.1f} MiB for {n} images)")

    @staticmethod
    def _feature_bytes(header: dict[str, Any]) -> int:
        k = int(header["views"]["num_views"])
        return sum(ArraySpec.from_json(name, d).bytes_per_image(k) for name, d in header["arrays"].items())

    def _open_store(self, header: dict[str, Any]) -> ArrayStore:
        try:
            store = ArrayStore.open(self.run_dir, header)
        except OfflineStoreError as exc:
            raise OfflineStoreError(f"{exc}. Run the 'offline' stage first.") from None
        if int(store.header["storage"].get("total_bytes", 0)) <= IN_MEMORY_STORE_BYTES:
            load = str(self.ctx.device) if self.ctx.device.type == "cuda" else "ram"
            store = ArrayStore.open(self.run_dir, header, load=load)
        return store

    # ---- student -------------------------------------------------------------------------------
    def _student_sampler(self) -> Any:
        """The student's ``train.sampler`` over the training split (CBD's samples per class visit)."""
        cfg = self.cfg
        return self.ctx.build_sampler(cfg.train.sampler, self.ctx.labels(cfg.data.train_split), cfg.optim.epochs,
                                      samples_per_class=cfg.cbd.samples_per_class)

    def build_student(self) -> CBDStudent:
        """A fresh student: ``model.arch`` over all classes (``model.classifier``) + the projection ``g``."""
        return CBDStudent(self.ctx.build_model(self.ctx.num_classes), self.total_teacher_width,
                          self.cfg.cbd.projection)

    def stage_student(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        f = cfg.cbd
        header = self.expected_header()

        def build() -> TrainParts:
            store = self._open_store(header)
            sampler = self._student_sampler()
            loss = CBDLoss(store, len(self.teachers), f.alpha, f.beta, ctx.device)
            return TrainParts(model=self.build_student(), loader=ctx.train_loader(sampler, cfg.optim.epochs,
                                                                                  views=store.views),
                              loss_fn=loss, forward_fn=loss.forward, hooks=ValAccuracyHook(self))

        self.train_stage(TrainJob("student", self.student_dir, self.student_fingerprint(header), build,
                                  meta={"arch": cfg.model.arch, "num_classes": ctx.num_classes,
                                        "teacher_width": self.total_teacher_width, "projection": f.projection}))

    # ---- eval ----------------------------------------------------------------------------------
    def stage_eval(self) -> None:
        cfg = self.cfg
        f = cfg.cbd
        header = self.expected_header()
        kinds = ", ".join(f"{t.record.augment} seed {t.record.seed}" for t in self.teachers)
        self.eval_stage(model_dir=self.student_dir, model_fp=self.student_fingerprint(header), model_stage="student",
                        recipe_info={"arch": cfg.model.arch, "classifier": cfg.model.classifier,
                                     "epochs": cfg.optim.epochs, "sampler": cfg.train.sampler,
                                     "samples_per_class": f.samples_per_class,
                                     "teachers": [t.to_json() for t in self.teachers], "teacher_arch": f.arch,
                                     "teacher_epochs": f.epochs, "alpha": f.alpha, "beta": f.beta,
                                     "projection": f.projection, "views": f.views, "feature_dtype": f.feature_dtype,
                                     "bytes_per_image": self._feature_bytes(header)},
                        title=f"{cfg.name}: CBD student {cfg.model.arch}, {len(self.teachers)} teacher(s) ({kinds})",
                        build=self.build_student, add=self._cbd_summary)

    def _cbd_summary(self, metrics: dict[str, Any]) -> None:
        """``metrics["cbd"]``: each teacher's own test metrics and the store's figures (collective)."""
        teachers = []
        for t in self.teachers:
            m = self.evaluate_model(self.load_teacher(t))
            entry = {**t.to_json(), "top1": m["top1"], "mean_class_top1": m["mean_class_top1"],
                     "subsets": {name: s["top1"] for name, s in m["subsets"].items()}}
            if "val" in m:
                entry["val_top1"] = m["val"]["top1"]
            teachers.append(entry)
            self.console(f"teacher {t.name} ({t.record.augment}, seed {t.record.seed}): test top-1 "
                         f"{100 * m['top1']:.2f}%")
        storage = json.loads((self.run_dir / "offline" / "header.json").read_text())["storage"]
        metrics["cbd"] = {"teachers": teachers, "bytes_per_image": storage.get("feature_bytes_per_image"),
                          "store_total_bytes": storage.get("total_bytes")}
