"""The recipe base class and the stage machinery every recipe shares.

A stage that trains a model is described by a :class:`TrainJob` (its folder, its fingerprint and a
function that builds the model, loader and loss) and run by :meth:`Recipe.train_stage`, which is
the one place that

1. skips the stage when ``STAGE/done.json`` holds the same fingerprint,
2. resumes from ``STAGE/checkpoints`` (inside :func:`lfme_fast.trainer.train_model`),
3. trains with the recipe's step hook (``on_step``: the tests' :class:`~lfme_fast.trainer.InterruptAfter`),
4. saves ``STAGE/model.pt`` with its fingerprint, exports it (``STAGE/model.safetensors`` +
   ``STAGE/model.json``, :mod:`lfme_fast.export`), writes the done-marker and removes the checkpoints,
5. sends every epoch record to the experiment trackers (``log.trackers``) and redraws ``RUN/curves.png``.

:meth:`Recipe.setup` checks everything a run needs (:meth:`Recipe.check`) before it writes anything:
``RUN/config.yaml``, ``RUN/train.log`` (a copy of the console) and the trackers start only then.

:meth:`Recipe.load_stage_model` loads a finished stage's model for a later stage (refusing one
trained under another fingerprint) and :meth:`Recipe.eval_stage` is the common ``eval`` stage
(``RUN/metrics.{json,md}``, ``RUN/per_class_accuracy.png``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from lfme_fast.checkpoint import load_model_file, remove_checkpoints, save_model_file, stage_done, write_done
from lfme_fast.config import Config, ConfigError, config_to_dict, fingerprint, save_config
from lfme_fast.evaluate import classification_metrics, predict, write_reports
from lfme_fast.logging_utils import Console, LogFile, flat_config, read_jsonl, tracker_init_kwargs, tracker_values
from lfme_fast.trainer import LoopSettings, RunContext, TrainHooks, TrainResult, build_accelerator, train_model

__all__ = ["Recipe", "TrainJob", "TrainParts", "ValAccuracyHook"]

#: Epoch-record fields not sent to the trackers (bookkeeping, not measurements).
_NOT_CURVES = frozenset({"shards", "world_size", "batches_done", "resumed_at_batch", "global_step"})


@dataclass
class TrainParts:
    """What one training needs, built only when the stage actually runs (not when it is skipped).

    ``epochs``/``lr`` default to ``optim.epochs``/``optim.lr``; ``forward_fn``/``hooks`` as in
    :func:`lfme_fast.trainer.train_model`.
    """

    model: torch.nn.Module
    loader: Any
    loss_fn: Callable[[Any, Any], Any]
    forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None
    hooks: Any = None
    epochs: int | None = None
    lr: float | None = None


@dataclass
class TrainJob:
    """A stage that trains one model into ``stage_dir``.

    Attributes:
        name: names the stage in messages, logs and the progress bar (``train``, ``expert-many``...).
        stage_dir: ``log.jsonl``, ``checkpoints/``, ``model.pt`` and ``done.json`` go here.
        fingerprint: the stage's identity (:func:`lfme_fast.config.fingerprint`).
        build: returns the :class:`TrainParts`; called only when the stage is not up to date.
        meta: stored with the weights in ``model.pt`` (``arch``, ``num_classes``, ...).
        finish: ``finish(result) -> [file names]``, called on every process after training (it may run
            collectives, e.g. an evaluation) and before the done-marker; it writes its files on the
            main process and returns their names (recorded in ``done.json``).
        final_meta: ``final_meta(result) -> dict`` merged into ``meta`` (values known only after training).
    """

    name: str
    stage_dir: Path
    fingerprint: str
    build: Callable[[], TrainParts]
    meta: Mapping[str, Any] = field(default_factory=dict)
    finish: Callable[[TrainResult], list[str]] | None = None
    final_meta: Callable[[TrainResult], Mapping[str, Any]] | None = None


class ValAccuracyHook(TrainHooks):
    """Adds ``val_top1`` and ``val_mean_class_top1`` (fractions) to every epoch record: the model scored
    on ``data.val_split`` after the epoch (a collective; the model goes back to train mode). Every
    recipe's all-class model (baselines, CBD teachers and student, LFME student, ECL) uses it, so each
    run folder holds its validation curve (``compare`` flags runs still moving at the end).

    Args:
        recipe: the running recipe (its context, config and accelerator).
        inner: a recipe hook to wrap (e.g. LFME's SpES); its callbacks and checkpoint state are
            delegated unchanged, so a checkpoint holds exactly what it held without this hook.
        forward_fn: ``forward_fn(model, images) -> logits`` for models whose ``model(images)`` is not
            the prediction (ECL's multi-expert model); see :func:`lfme_fast.evaluate.predict`.
    """

    def __init__(self, recipe: "Recipe", inner: TrainHooks | None = None,
                 forward_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None):
        self.recipe = recipe
        self.inner = inner
        self.forward_fn = forward_fn
        self._preds: Any = None

    def on_epoch_start(self, epoch: int, model: torch.nn.Module) -> None:
        if self.inner is not None:
            self.inner.on_epoch_start(epoch, model)

    def val_predictions(self, model: torch.nn.Module) -> Any:
        """The model's :class:`~lfme_fast.evaluate.Predictions` (with logits) on ``data.val_split`` at
        this epoch's end, computed once per epoch (a collective): an inner hook that scores the model
        on the val split too (LFME's SpES) calls this instead of a second pass."""
        if self._preds is None:
            self._preds = predict(model, self.recipe.ctx.eval_loader(self.recipe.cfg.data.val_split),
                                  self.recipe.accelerator, keep_logits=True, forward_fn=self.forward_fn)
        return self._preds

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> dict[str, Any]:
        self._preds = None
        try:
            record = dict(self.inner.on_epoch_end(epoch, model)) if self.inner is not None else {}
            ctx, split = self.recipe.ctx, self.recipe.cfg.data.val_split
            if split is None:
                return record
            m = classification_metrics(self.val_predictions(model), ctx.train_counts, self.recipe.cfg.eval.convention,
                                       self.recipe.cfg.eval.thresholds, split=split)
            return {**record, "val_top1": m["top1"], "val_mean_class_top1": m["mean_class_top1"]}
        finally:
            self._preds = None  # the next epoch's model is another

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)


def _sync_buffers(model: torch.nn.Module, accelerator: Any) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP keeps parameters in step, but each rank's last forward updated its own running statistics, so
    without this the in-memory model of rank r > 0 differs from the saved ``model.pt`` (rank 0's), and
    what a later stage computes with it on that rank (its share of an offline store, an evaluation)
    would come from another model.
    """
    if accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


class Recipe:
    """Base recipe: owns the config, the Accelerator and the run folder; runs stages in order.

    Subclasses set ``STAGES`` (stage names, in order; one method ``stage_<name>()`` each) and
    ``SECTIONS`` (their own config sections, ``{name: dataclass}``), and register themselves in
    :data:`lfme_fast.recipes.RECIPES`.

    Args:
        cfg: the validated config.
        accelerator: an ``accelerate.Accelerator`` (one is built from ``cfg.precision`` when None).
        on_step: called as ``on_step(global_step, desc)`` after every optimizer step of every training
            this recipe runs (tests pass :class:`lfme_fast.trainer.InterruptAfter`).
    """

    STAGES: tuple[str, ...] = ()
    SECTIONS: Mapping[str, type] = {}

    def __init__(self, cfg: Config, accelerator: Any = None, *, on_step: Callable[[int, str], None] | None = None):
        self.cfg = cfg
        self.accelerator = accelerator
        self.on_step = on_step
        self.run_dir = cfg.run_dir
        self.ctx: RunContext | None = None
        self.console = Console(True)
        #: models trained in this process, by stage folder (a later stage uses them without reloading)
        self.trained: dict[Path, torch.nn.Module] = {}
        self.log_file = LogFile(self.run_dir / "train.log", enabled=False)
        #: training stages of this run so far, name -> folder (their logs make RUN/curves.png)
        self.curve_stages: dict[str, Path] = {}
        self._tracker_step = 0
        self._preprocess: dict[str, Any] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check what the run needs, then create the run folder, ``config.yaml``, ``train.log`` and the trackers.

        The Accelerator (unless given; it checks ``log.trackers``), the dataset (:class:`RunContext`) and
        :meth:`check` come first, so a run that cannot start writes nothing.

        Raises:
            ConfigError, lfme_fast.shards.DataError, lfme_fast.shards.DatasetLayoutError: the config, the
                dataset or an installed package does not allow the run (the command line prints one line).
        """
        from accelerate.utils import set_seed

        if self.accelerator is None:
            self.accelerator = build_accelerator(self.cfg)
        acc = self.accelerator
        self.console = Console(acc.is_main_process, self.cfg.name)
        set_seed(self.cfg.seed)
        self.ctx = RunContext(self.cfg, acc)
        # from here on the config of this launch: global batches resolved to per-process ones
        # (lfme_fast.scale.resolve_world); config.yaml keeps the file's form, which any launch can read
        self.cfg = self.ctx.cfg
        self.check()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.ctx.launch_cfg, self.run_dir / "config.yaml")
        self.log_file = LogFile(self.run_dir / "train.log", enabled=acc.is_main_process)
        self.log_file.open(f"{self.cfg.name}: recipe {self.cfg.recipe}")
        acc.wait_for_everyone()
        if self.cfg.log.trackers:
            acc.init_trackers(self.cfg.name, config=flat_config(config_to_dict(self.cfg)),
                              init_kwargs=tracker_init_kwargs(self.run_dir))
        self.console(f"recipe {self.cfg.recipe}, stages {list(self.cfg.stages)}, {acc.num_processes} process(es) "
                     f"on {acc.device}, mixed precision {acc.mixed_precision}, run folder {self.run_dir}")
        from lfme_fast.scale import describe

        self.console(f"batch: {describe(self.ctx.batch)}; loader workers per process: "
                     f"{self.ctx.num_workers} (data.num_workers)")
        if self.cfg.log.tensorboard:
            self.console("log.tensorboard is deprecated: write log.trackers: [tensorboard] (it does the same)")
        if self.cfg.log.trackers:
            self.console(f"trackers {list(self.cfg.log.trackers)} logging under {self.run_dir / 'trackers'}")

    def check(self) -> None:
        """Checks that need the dataset or installed packages and write nothing; run by :meth:`setup`
        before the run folder is made. A recipe with checks of its own extends it (``super().check()``).

        Base checks: ``model.pretrained`` is a file; the loader back end is installed; the training split
        can be served with the data settings (resolution, augmentation); the trackers are in the
        Accelerator (one given to the recipe must have been built with them).
        """
        from lfme_fast.loaders import backend_missing, resolve_spec
        from lfme_fast.shards import DataError

        cfg, ctx = self.cfg, self.ctx
        if cfg.model.pretrained is not None and not Path(cfg.model.pretrained).is_file():
            raise ConfigError(f"model.pretrained: {cfg.model.pretrained} is not a file (README, 'Pretrained "
                              "weights', says where to get one)")
        missing = backend_missing(cfg.data.backend)
        if missing:
            raise ConfigError(f"data.backend: {missing}")
        try:
            resolve_spec(ctx.loader_options(cfg.data.train_split, train=True, batch_size=cfg.data.batch_size))
        except ValueError as exc:
            raise DataError(f"data (split {cfg.data.train_split!r} of {ctx.root}): {exc}") from None
        given = {str(t) for t in (getattr(self.accelerator, "log_with", None) or [])}
        absent = [t for t in cfg.log.trackers if t not in given]
        if absent:
            raise ConfigError(f"log.trackers: {absent} are not in the Accelerator given to the recipe; build it "
                              "with lfme_fast.trainer.build_accelerator(cfg)")

    def train(self) -> None:
        """Run the configured stages in the recipe's order."""
        for stage in self.cfg.stages:
            getattr(self, f"stage_{stage}")()

    def cleanup(self) -> None:
        """Wait for every process; end the trackers; close ``train.log``."""
        try:
            if self.accelerator is not None:
                self.accelerator.wait_for_everyone()
                self.accelerator.end_training()
        finally:
            self.log_file.close()

    def run(self) -> None:
        """``setup()`` then :meth:`run_stages`."""
        self.setup()
        self.run_stages()

    def run_stages(self) -> None:
        """``train(); cleanup()``; a failure is noted in ``train.log`` before it propagates."""
        try:
            self.train()
        except BaseException as exc:
            self.log_file.write(f"[{self.cfg.name}] stopped: {type(exc).__name__}: {exc}")
            raise
        finally:
            self.cleanup()

    # ---- trackers and curves ---------------------------------------------------------------------
    def log_metrics(self, stage: str, record: Mapping[str, Any]) -> None:
        """Send a record's numbers to the trackers as ``<stage>/<key>`` (nested per-subset values as
        ``<stage>/<key>/<subset>``), with the record's own ``<stage>/epoch`` when it has one.

        The tracker step counts the records logged by this run so far, across stages: each stage's own
        epoch counter restarts at 0, and trackers such as wandb ignore a step that goes back.
        """
        if not self.cfg.log.trackers:
            return
        # bookkeeping fields of the epoch record (shard audit, process count) are not curves
        values = tracker_values({k: v for k, v in record.items() if k not in _NOT_CURVES}, stage)
        if "epoch" in record:
            values[f"{stage}/epoch"] = float(record["epoch"]) + 1
        self._tracker_step += 1
        self.accelerator.log(values, step=self._tracker_step)

    def write_curves(self) -> None:
        """``RUN/curves.png``: loss and learning rate per epoch of every training stage so far (main process)."""
        if not self.accelerator.is_main_process or not self.curve_stages:
            return
        from lfme_fast.plots import plot_training_curves

        logs = {name: [r for r in read_jsonl(Path(d) / "log.jsonl") if r.get("event") == "epoch"]
                for name, d in self.curve_stages.items()}
        plot_training_curves(self.run_dir / "curves.png", logs, title=self.cfg.name)

    # ---- stage machinery -------------------------------------------------------------------------
    def skip_if_done(self, stage_dir: Path, fp: str, what: str) -> bool:
        """True (and a message) when ``stage_dir`` holds a finished result with fingerprint ``fp``."""
        if stage_done(stage_dir, fp):
            self.console(f"{what}: outputs in {stage_dir} are up to date (fingerprint {fp}); skipping")
            return True
        return False

    def offline_up_to_date(self, header: Mapping[str, Any], store_class: Any = None,
                           draws: Callable[[], Any] | None = None) -> bool:
        """True (and a message) when ``RUN/offline`` holds a finished store with identity ``header``;
        otherwise False, saying why an existing store is rebuilt (the recipes' ``offline`` stages).
        ``draws``: for a drawn store, this process's rows (:meth:`student_draws`); a store that lacks
        any of them on any process is rebuilt (e.g. one made by other plan code under the same header)."""
        from lfme_fast.offline import ArrayStore, OfflineStoreError, sum_over_ranks

        try:
            store = (store_class or ArrayStore).open(self.run_dir, header)
        except OfflineStoreError as exc:
            if (self.run_dir / "offline").exists():
                self.console(f"offline: rebuilding ({exc})")
            return False
        if draws is not None and store.drawn is not None:
            lacking = sum_over_ranks(int((draws() & ~np.asarray(store.drawn)).sum()), self.accelerator)
            if lacking:
                self.console(f"offline: rebuilding ({store.directory} lacks {lacking} (image, view) rows this run's "
                             "plan draws)")
                return False
        self.console(f"offline: store in {store.directory} is up to date ({store.data_bytes_per_image:.0f} "
                     "bytes/image); skipping")
        return True

    # ---- offline stores: loaders and the drawn fill --------------------------------------------
    def offline_loader(self, table: Any, k: int, rows: Any = None) -> Any:
        """The loader of one offline pass (``write_store``'s ``make_loader``): view ``k`` of ``table``
        for this process's share of every training sample, or exactly ``rows`` (a drawn pass)."""
        from lfme_fast.loaders import build_loader
        from lfme_fast.offline import IndexSampler

        return build_loader(self.ctx.loader_options(
            self.cfg.data.train_split, train=False, batch_size=self.cfg.data.eval_batch_size, views=table,
            fixed_view=k, sampler=None if rows is None else IndexSampler(rows)))

    def fill_identity(self, fill: str, sampler: str, **settings: Any) -> dict[str, Any]:
        """The store header's ``views`` entries for ``fill`` (:func:`lfme_fast.offline.drawn_identity`)
        of a student that trains ``optim.epochs`` epochs with ``sampler``, in global batches of
        ``data.batch_size`` x processes x ``train.grad_accum``."""
        from lfme_fast.offline import drawn_identity

        c = self.cfg
        global_batch = c.data.batch_size * self.accelerator.num_processes * c.train.grad_accum
        return drawn_identity(fill, sampler=sampler, epochs=c.optim.epochs, global_batch=global_batch, seed=c.seed,
                              epoch_samples=c.train.epoch_samples, max_steps_per_epoch=c.train.max_steps_per_epoch,
                              **settings)

    def student_draws(self, sampler: Any, views: Any) -> Any:
        """bool ``[N, K]``: the stored rows this process's student reads over ``optim.epochs`` epochs
        when it replays ``views`` in ``sampler``'s order (:func:`lfme_fast.offline.drawn_pairs`)."""
        from lfme_fast.offline import drawn_pairs

        c = self.cfg
        opts = self.ctx.loader_options(c.data.train_split, train=True, batch_size=c.data.batch_size, sampler=sampler,
                                       total_epochs=c.optim.epochs, views=views)
        return drawn_pairs(opts, c.optim.epochs, grad_accum=c.train.grad_accum,
                           max_steps=c.train.max_steps_per_epoch)

    def train_stage(self, job: TrainJob) -> TrainResult | None:
        """Run ``job`` (skip / resume / train / save / done-marker); None when it was up to date.

        Every process must call it. The trained model is kept in :attr:`trained` under the stage folder.
        """
        self.curve_stages[job.name] = Path(job.stage_dir)
        if self.skip_if_done(job.stage_dir, job.fingerprint, job.name):
            return None
        if not Path(job.stage_dir).resolve().is_relative_to(self.run_dir.resolve()):
            # a folder linked from another run (compare's shared experts): never retrain into it
            raise RuntimeError(f"stage {job.name!r} is not up to date in {job.stage_dir}, which links to "
                               f"{Path(job.stage_dir).resolve()} outside this run ({self.run_dir}); this run's "
                               "settings differ from the run it shares that folder with: remove the link to train "
                               "its own")
        parts = job.build()
        loop = LoopSettings.from_config(self.cfg, epochs=parts.epochs, desc=job.name)
        result = train_model(parts.model, parts.loader, parts.loss_fn, accelerator=self.accelerator,
                             optim=self.cfg.optim, lr=parts.lr, loop=loop, stage_dir=job.stage_dir,
                             forward_fn=parts.forward_fn, hooks=parts.hooks, fingerprint=job.fingerprint,
                             channels_last=self.ctx.channels_last, on_step=self.on_step,
                             on_epoch=lambda rec: self.log_metrics(job.name, rec))
        del parts
        _sync_buffers(result.model, self.accelerator)
        extra = job.finish(result) if job.finish is not None else []
        if self.accelerator.is_main_process:
            meta = {**job.meta, "fingerprint": job.fingerprint, "global_step": result.global_step}
            if job.final_meta is not None:
                meta.update(job.final_meta(result))
            save_model_file(job.stage_dir / "model.pt", result.model, meta)
            exported = self.export_stage_model(job, result.model, meta)
            write_done(job.stage_dir, job.fingerprint, ["model.pt", *exported, "log.jsonl", *extra])
            remove_checkpoints(job.stage_dir)
            self.write_curves()
        self.accelerator.wait_for_everyone()
        self.trained[Path(job.stage_dir)] = result.model
        return result

    def eval_preprocess(self) -> dict[str, Any]:
        """The preprocessing of this run's evaluation (resolution, centre crop or resize, mean/std) as
        :func:`lfme_fast.export.preprocess_info` records it (resolved once per run)."""
        if self._preprocess is None:
            from lfme_fast.export import preprocess_info
            from lfme_fast.loaders import resolve_spec

            split = self.cfg.data.test_split
            spec = resolve_spec(self.ctx.loader_options(split, train=False, batch_size=1))
            self._preprocess = preprocess_info(spec)
        return self._preprocess

    def export_stage_model(self, job: TrainJob, model: torch.nn.Module, meta: Mapping[str, Any]) -> list[str]:
        """Write ``STAGE/model.safetensors`` + ``STAGE/model.json`` (:func:`lfme_fast.export.export_model`)
        for a stage's trained model; returns the file names. A model over a class subset (an LFME expert:
        ``meta["subset"]``) records the dataset classes of its output columns and their names."""
        from lfme_fast.export import config_sha256, export_model

        ctx = self.ctx
        subset = meta.get("subset")
        classes = list(subset["classes"]) if isinstance(subset, Mapping) else list(range(ctx.num_classes))
        names = ctx.class_names if len(ctx.class_names) == ctx.num_classes else [str(c) for c in
                                                                                   range(ctx.num_classes)]
        training = {"recipe": self.cfg.recipe, "stage": job.name, "run_name": self.cfg.name,
                    "config_sha256": config_sha256(self.ctx.launch_cfg), "stage_fingerprint": job.fingerprint,
                    "dataset": ctx.manifest.get("dataset"), "data_root": str(ctx.root),
                    "train_split": self.cfg.data.train_split,
                    "train_split_fingerprint": ctx.split_fingerprint(self.cfg.data.train_split),
                    "global_step": meta.get("global_step")}
        return export_model(job.stage_dir, model, classes=classes, class_names=[names[c] for c in classes],
                            preprocess=self.eval_preprocess(), training=training)

    def load_stage_model(self, stage_dir: Path, fp: str, build: Callable[[], torch.nn.Module],
                         stage: str) -> torch.nn.Module:
        """The model stage ``stage`` trained into ``stage_dir`` (from this process when it trained it
        here, else from ``model.pt``), on the run's device.

        Raises:
            FileNotFoundError: no model file (the stage has not run).
            ValueError: the file was trained under another fingerprint (the stage must be re-run).
        """
        if Path(stage_dir) in self.trained:
            return self.trained[Path(stage_dir)]
        path = Path(stage_dir) / "model.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the {stage!r} stage first")
        state, meta = load_model_file(path)
        if meta.get("fingerprint") != fp:
            raise ValueError(f"{path} was trained under another configuration (fingerprint "
                             f"{meta.get('fingerprint')} != {fp}); re-run the {stage!r} stage")
        model = build()
        model.load_state_dict(state)
        return model.to(self.ctx.device)

    # ---- evaluation ------------------------------------------------------------------------------
    def eval_fingerprint(self, model_fp: str) -> str:
        """The ``eval`` stage's identity: the evaluated model's fingerprint, eval settings, test data."""
        return fingerprint(self.cfg, ("eval", "data.test_split", "data.val_split"),
                           {"model": model_fp, "test_data": self.ctx.split_fingerprint(self.cfg.data.test_split)})

    def eval_stage(self, *, model_dir: Path, model_fp: str, model_stage: str, recipe_info: Mapping[str, Any],
                   title: str, build: Callable[[], torch.nn.Module] | None = None,
                   add: Callable[[dict[str, Any]], None] | None = None) -> None:
        """The common ``eval`` stage: test (and val) metrics of the model in ``model_dir`` written to
        ``RUN/metrics.*``; skipped when up to date.

        ``recipe_info`` goes to ``metrics["recipe"]``; ``add(metrics)`` may add recipe-specific
        entries (collective: called on every process); ``build`` makes an empty model for loading
        (default: ``model.arch`` over all classes).
        """
        fp = self.eval_fingerprint(model_fp)
        if self.skip_if_done(self.run_dir / "eval", fp, "eval"):
            return
        build = build or (lambda: self.ctx.build_model(self.ctx.num_classes))
        model = self.load_stage_model(model_dir, model_fp, build, model_stage)
        metrics = self.evaluate_model(model)
        metrics["recipe"] = {"name": self.cfg.recipe, **recipe_info}
        if add is not None:
            add(metrics)
        self.write_eval(metrics, fp, title)

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, Any]:
        """Test metrics (plus a val summary when ``data.val_split`` is set) of a full-label-space model."""
        cfg, ctx = self.cfg, self.ctx
        ev = cfg.eval

        def on(split: str) -> dict[str, Any]:
            preds = predict(model, ctx.eval_loader(split), self.accelerator, keep_logits=True)
            return classification_metrics(preds, ctx.train_counts, ev.convention, ev.thresholds, split=split)

        metrics = on(cfg.data.test_split)
        if cfg.data.val_split is not None and cfg.data.val_split != cfg.data.test_split:
            val = on(cfg.data.val_split)
            metrics["val"] = {k: val[k] for k in ("split", "num_samples", "top1", "mean_class_top1", "subsets")}
        metrics["world_size"] = self.accelerator.num_processes
        return metrics

    def write_eval(self, metrics: dict[str, Any], fp: str, title: str) -> None:
        """Write RUN/metrics.{json,md}, RUN/per_class_accuracy.png and the eval done-marker."""
        if self.accelerator.is_main_process:
            files = write_reports(self.run_dir, metrics, title=title, class_names=self.ctx.class_names,
                                  convention=self.cfg.eval.convention, thresholds=self.cfg.eval.thresholds)
            write_done(self.run_dir / "eval", fp, [f"../{f}" for f in files])
            summary = {"top1": metrics["top1"], "mean_class_top1": metrics.get("mean_class_top1"),
                       **{f"top1_{name}": s["top1"] for name, s in metrics["subsets"].items()}}
            if "val" in metrics:
                summary["val_top1"] = metrics["val"]["top1"]
            self.log_metrics("eval", summary)
            parts = [f"{name} " + ("-" if s["top1"] is None else f"{100 * s['top1']:.2f}%")
                     for name, s in metrics["subsets"].items()]
            self.console(f"test top-1 {100 * metrics['top1']:.2f}% | " + " | ".join(parts)
                         + f" ({metrics['convention']})")
        self.accelerator.wait_for_everyone()
