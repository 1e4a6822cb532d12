"""Entry point: ``accelerate launch lfme_fast/train.py --config CONFIG [--output-dir DIR] [key=value ...]``.

``python lfme_fast/train.py ...`` and ``python -m lfme_fast.train ...`` run the same on one process.

A *recipe* is a class with ``setup()``, ``train()`` (runs the configured stages in order) and
``cleanup()`` (torchtune's shape). Recipes are registered by name in :data:`RECIPES`; an entry may be
a class or a lazy ``"module:Class"`` string, so a recipe can live in its own module (``lfme`` ->
``lfme_fast.student:LFMERecipe``) without this file importing it up front.

Run folder::

    RUN/config.yaml            the resolved config (every key, after overrides)
    RUN/train/                 baseline: log.jsonl, checkpoints/, model.pt, done.json
    RUN/experts/<subset>/      experts (see lfme_fast.experts)
    RUN/eval/done.json         eval stage marker
    RUN/metrics.json           test metrics (overall, per subset with the convention named, per class)
    RUN/metrics.md             the same as markdown tables
    RUN/per_class_accuracy.png per-class accuracy against training frequency

Every stage records a fingerprint of the config keys it depends on in its ``done.json``; a stage whose
outputs exist with the same fingerprint is skipped, and an interrupted stage resumes from its latest
checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run by path (``accelerate launch lfme_fast/train.py``): Python put lfme_fast/ itself first on
    # sys.path, where its modules (io.py, config.py, ...) would shadow top-level names. Put the
    # repository root there instead so ``import lfme_fast`` works without installation.
    _root = str(Path(__file__).resolve().parents[1])
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root
    elif _root not in sys.path:
        sys.path.insert(0, _root)

import argparse
import importlib
import json
from typing import Any, Sequence

import numpy as np
import torch

from lfme_fast.checkpoint import load_model_file, remove_checkpoints, save_model_file, stage_done, write_done
from lfme_fast.config import RECIPE_STAGES, Config, fingerprint, load_config, save_config
from lfme_fast.evaluate import classification_metrics, predict, write_reports
from lfme_fast.io import atomic_write_json
from lfme_fast.logging_utils import Console
from lfme_fast.losses import balanced_softmax_loss, logit_adjusted_loss, weighted_cross_entropy
from lfme_fast.trainer import MODEL_KEYS, LoopSettings, RunContext, build_accelerator, train_model

__all__ = ["Recipe", "BaselineRecipe", "ExpertsRecipe", "RECIPES", "get_recipe", "run", "main"]


class Recipe:
    """Base recipe: owns the config, the Accelerator and the run folder; runs stages in order.

    Subclasses define ``STAGES`` (must equal ``config.RECIPE_STAGES[name]``) and one method
    ``stage_<name>()`` per stage. ``interrupt_after_steps`` is passed to the training loops (tests).
    """

    STAGES: tuple[str, ...] = ()

    def __init__(self, cfg: Config, accelerator: Any = None, *, interrupt_after_steps: int | None = None):
        self.cfg = cfg
        self.accelerator = accelerator
        self.interrupt_after_steps = interrupt_after_steps
        self.run_dir = cfg.run_dir
        self.ctx: RunContext | None = None
        self.console = Console(True)

    def setup(self) -> None:
        """Create the Accelerator (unless given), the run folder and ``config.yaml``; read the dataset."""
        from accelerate.utils import set_seed

        if self.accelerator is None:
            self.accelerator = build_accelerator(self.cfg)
        acc = self.accelerator
        self.console = Console(acc.is_main_process, self.cfg.name)
        set_seed(self.cfg.seed)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        acc.wait_for_everyone()
        self.ctx = RunContext(self.cfg, acc)
        self.console(f"recipe {self.cfg.recipe}, stages {list(self.cfg.stages)}, {acc.num_processes} process(es) "
                     f"on {acc.device}, mixed precision {acc.mixed_precision}, run folder {self.run_dir}")

    def train(self) -> None:
        """Run the configured stages in the recipe's order."""
        for stage in self.cfg.stages:
            getattr(self, f"stage_{stage}")()

    def cleanup(self) -> None:
        """Wait for every process; release Accelerate's state."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()

    def run(self) -> None:
        """``setup(); train(); cleanup()``."""
        self.setup()
        try:
            self.train()
        finally:
            self.cleanup()

    # ---- helpers shared by recipes ----------------------------------------------------------------
    def skip_if_done(self, stage_dir: Path, fp: str, what: str) -> bool:
        """True (and a message) when ``stage_dir`` holds a finished result with fingerprint ``fp``."""
        if stage_done(stage_dir, fp):
            self.console(f"{what}: outputs in {stage_dir} are up to date (fingerprint {fp}); skipping")
            return True
        return False

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
            parts = [f"{name} " + ("-" if s["top1"] is None else f"{100 * s['top1']:.2f}%")
                     for name, s in metrics["subsets"].items()]
            self.console(f"test top-1 {100 * metrics['top1']:.2f}% | " + " | ".join(parts)
                         + f" ({metrics['convention']})")
        self.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------
# baseline: one model, CE / Balanced Softmax / logit adjustment, any sampler
# ---------------------------------------------------------------------------------------------------


class BaselineRecipe(Recipe):
    """One model trained with ``train.loss`` under ``train.sampler``, then evaluated.

    Stages: ``train`` -> ``RUN/train/model.pt``; ``eval`` -> ``RUN/metrics.*``.
    """

    STAGES = RECIPE_STAGES["baseline"]

    @property
    def train_fingerprint(self) -> str:
        return fingerprint(self.cfg, MODEL_KEYS, self.ctx.model_fingerprint_extra())

    @property
    def model_path(self) -> Path:
        return self.run_dir / "train" / "model.pt"

    def _loss_fn(self):
        t = self.cfg.train
        counts = torch.as_tensor(self.ctx.train_counts, device=self.ctx.device)
        if t.loss == "ce":
            return lambda batch, logits: weighted_cross_entropy(logits, batch.labels)
        if t.loss == "balanced_softmax":
            return lambda batch, logits: balanced_softmax_loss(logits, batch.labels, counts)
        if t.loss == "logit_adjusted":
            return lambda batch, logits: logit_adjusted_loss(logits, batch.labels, counts, t.tau)
        raise ValueError(f"train.loss={t.loss!r} is not supported by the baseline recipe")

    def stage_train(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        stage_dir = self.run_dir / "train"
        fp = self.train_fingerprint
        if self.skip_if_done(stage_dir, fp, "train"):
            return
        epochs = cfg.optim.epochs
        model = ctx.build_model(ctx.num_classes)
        sampler = ctx.build_sampler(cfg.train.sampler, ctx.labels(cfg.data.train_split), epochs)
        loader = ctx.train_loader(sampler, epochs)
        result = train_model(model, loader, self._loss_fn(), accelerator=self.accelerator, optim=cfg.optim,
                             loop=LoopSettings.from_config(cfg, desc="train"), stage_dir=stage_dir, fingerprint=fp,
                             channels_last=ctx.channels_last, interrupt_after_steps=self.interrupt_after_steps)
        if self.accelerator.is_main_process:
            save_model_file(self.model_path, result.model,
                            {"arch": cfg.model.arch, "num_classes": ctx.num_classes, "fingerprint": fp,
                             "global_step": result.global_step})
            write_done(stage_dir, fp, ["model.pt", "log.jsonl"])
            remove_checkpoints(stage_dir)
        self.accelerator.wait_for_everyone()
        self._trained = result.model

    def stage_eval(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        fp = fingerprint(cfg, ("eval", "data.test_split", "data.val_split"),
                         {"model": self.train_fingerprint, "test_data": ctx.split_fingerprint(cfg.data.test_split)})
        if self.skip_if_done(self.run_dir / "eval", fp, "eval"):
            return
        model = getattr(self, "_trained", None)
        if model is None:
            if not self.model_path.exists():
                raise FileNotFoundError(f"{self.model_path} not found: run the 'train' stage first")
            state, meta = load_model_file(self.model_path)
            if meta.get("fingerprint") != self.train_fingerprint:
                raise ValueError(f"{self.model_path} was trained under another configuration "
                                 f"(fingerprint {meta.get('fingerprint')} != {self.train_fingerprint}); "
                                 "re-run the 'train' stage")
            model = ctx.build_model(ctx.num_classes)
            model.load_state_dict(state)
            model = model.to(ctx.device)
        metrics = self.evaluate_model(model)
        metrics["recipe"] = {"name": cfg.recipe, "loss": cfg.train.loss, "sampler": cfg.train.sampler,
                             "arch": cfg.model.arch, "epochs": cfg.optim.epochs}
        self.write_eval(metrics, fp, f"{cfg.name}: {cfg.model.arch}, {cfg.train.loss}, {cfg.train.sampler} sampling")


# ---------------------------------------------------------------------------------------------------
# experts only (LFME's first stage on its own)
# ---------------------------------------------------------------------------------------------------


class ExpertsRecipe(Recipe):
    """Train the LFME experts only (``RUN/experts/``); ``RUN/metrics.json`` summarises them."""

    STAGES = RECIPE_STAGES["experts"]

    def stage_experts(self) -> None:
        from lfme_fast.experts import train_experts

        infos = train_experts(self.cfg, self.accelerator, self.run_dir,
                              interrupt_after_steps=self.interrupt_after_steps)
        if self.accelerator.is_main_process:
            atomic_write_json(self.run_dir / "metrics.json",
                              {"experts": {i.subset.name: i.metrics for i in infos},
                               "world_size": self.accelerator.num_processes})


#: Recipe registry: name -> class, or a lazy "module:Class" path resolved on first use.
RECIPES: dict[str, Any] = {
    "baseline": BaselineRecipe,
    "experts": ExpertsRecipe,
    "lfme": "lfme_fast.student:LFMERecipe",
}


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name`` (importing its module if registered lazily)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; registered: {sorted(RECIPES)}")
    entry = RECIPES[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"recipe {name!r} is registered as {RECIPES[name]!r}, which cannot be loaded ({exc})") \
                from None
        RECIPES[name] = entry
    if tuple(entry.STAGES) != RECIPE_STAGES.get(name):
        raise ValueError(f"recipe {name!r}: class stages {entry.STAGES} differ from config.RECIPE_STAGES "
                         f"{RECIPE_STAGES.get(name)}")
    return entry


def run(cfg: Config, accelerator: Any = None, *, interrupt_after_steps: int | None = None) -> Recipe:
    """Run ``cfg``'s recipe in this process (the programmatic form of the CLI); returns the recipe."""
    recipe = get_recipe(cfg.recipe)(cfg, accelerator, interrupt_after_steps=interrupt_after_steps)
    recipe.run()
    return recipe


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lfme_fast/train.py",
        description="Train and evaluate one experiment. Overrides are section.key=value (value parsed as YAML), "
                    "e.g. data.root=data/fmnist_lt optim.epochs=2 experts.thresholds=[1000,200].")
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("--output-dir", help="run folder (overrides output_dir; default runs/<name>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={json.dumps(str(args.output_dir))}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        from lfme_fast.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    run(cfg)
    return 0


if __name__ == "__main__":
    # Delegate to the package module so there is one copy of RECIPES (this file also runs as __main__).
    from lfme_fast.train import main as _main

    sys.exit(_main())
