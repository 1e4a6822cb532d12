"""The ``experts`` recipe and LFME's experts: one model per cardinality-adjacent class subset (paper Sec. 4.1).

Expert ``l`` sees only the training images of its subset ``S_l`` (instance sampling within the subset,
:class:`lfme_fast.sampling.SubsetSampler`), and its label space is ``S_l``'s classes: global class
``c`` maps to local label ``label_map[c]`` (``-1`` outside the subset); output column ``j`` is global
class ``classes[j]`` (ascending). Any number ``L >= 2`` of subsets works; they come from
``experts.convention`` or ``experts.thresholds``, and an empty subset is an error (an expert with no
classes cannot be trained; pick thresholds that suit the dataset).

Layout::

    RUN/experts/<subset>/model.pt      {"state_dict", "meta": {"subset": {...classes...}, "arch", ...}}
    RUN/experts/<subset>/metrics.json  val (and test) top-1 on the subset's images, within its classes
    RUN/experts/<subset>/log.jsonl     training log; checkpoints/ while training; done.json when finished
    RUN/experts/summary.json           every expert's metrics

Each expert is its own stage with its own fingerprint (config keys + its subset's classes + the
data), so a re-run skips finished experts and resumes an interrupted one.

Config section ``experts`` (:class:`ExpertsConfig`; used by the ``experts`` and ``lfme`` recipes):
``convention`` (lfme | strict), ``thresholds`` (null: the convention's; else strictly descending
inclusive lower bounds, any L >= 2), ``epochs``, ``batch_size`` (per process: one int, or one per
subset, many -> few), ``global_batch_size`` (the same, for all processes together, as the paper gives
it: 128/64/32 for ImageNet-LT; the per-process batch is ``global / (world size x train.grad_accum)``;
at most one of the two; both null: ``data``'s form and value), ``lr``, ``arch`` (null: each inherits
the ``optim``/``data``/``model`` value), ``sampler`` (instance), ``eval_test`` (also score each expert on the test split).

``python -m lfme_fast.experts compare --experts RUN_E --model RUN_B --out FILE`` compares experts with
a single model on each subset (LFME Fig. 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from lfme_fast.checkpoint import load_model_file
from lfme_fast.config import Check, Config, OptimConfig, fingerprint
from lfme_fast.evaluate import predict, subset_accuracy
from lfme_fast.bench.common import write_result
from lfme_fast.io import atomic_write_json
from lfme_fast.losses import weighted_cross_entropy
from lfme_fast.recipes.base import Recipe, TrainJob, TrainParts
from lfme_fast.subsets import Subset, describe_convention, resolve_thresholds, split_classes
from lfme_fast.trainer import MODEL_KEYS, RunContext, TrainHooks

__all__ = ["ExpertsConfig", "ExpertsRecipe", "ExpertInfo", "expert_subsets", "label_map", "train_experts",
           "load_experts", "compare_with_model", "EXPERT_KEYS"]


@dataclass(frozen=True)
class ExpertsConfig:
    """Config section ``experts`` (see the module docstring)."""

    #: a global batch that does not divide into the launch is reported by the experts stage, naming the
    #: subset and its size (lfme_fast.scale.resolve_world leaves it to us)
    BATCH_ERRORS_LATE = True

    convention: Literal["lfme", "strict"] = "lfme"
    thresholds: tuple[int, ...] | None = None
    epochs: int | None = None
    batch_size: int | tuple[int, ...] | None = None
    global_batch_size: int | tuple[int, ...] | None = None
    lr: float | None = None
    arch: str | None = None
    sampler: Literal["instance"] = "instance"
    eval_test: bool = True

    def resolve(self, cfg: Config, check: Check) -> "ExpertsConfig":
        """Check values; unset ``epochs``/``batch_size``/``lr``/``arch`` inherit ``optim``/``data``/``model``."""
        from lfme_fast.models import MODELS

        try:
            n_subsets = len(resolve_thresholds(self.convention, self.thresholds)) + 1
        except ValueError as exc:
            raise check.fail("experts.thresholds", str(exc)) from None
        check(self.arch is None or self.arch in MODELS, "experts.arch",
              f"unknown architecture {self.arch!r}; known: {sorted(MODELS)}")
        check(self.epochs is None or self.epochs >= 1, "experts.epochs", "must be >= 1 or null")
        check(self.lr is None or self.lr > 0, "experts.lr", "must be > 0 or null")
        check(self.batch_size is None or self.global_batch_size is None, "experts.global_batch_size",
              f"is {self.global_batch_size} but experts.batch_size is {self.batch_size} too: give the experts' "
              "batch per process or for all processes, not both; set the other to null")
        for key in ("batch_size", "global_batch_size"):
            value = getattr(self, key)
            bs = value if isinstance(value, tuple) else (value,) if value is not None else ()
            check(all(b >= 1 for b in bs), f"experts.{key}", "must be >= 1")
            if isinstance(value, tuple):
                check(len(value) == n_subsets, f"experts.{key}",
                      f"a list needs one entry per subset ({n_subsets}), got {len(value)}")
        batch, global_batch = self.batch_size, self.global_batch_size
        if batch is None and global_batch is None:  # inherit data's form and value
            batch, global_batch = cfg.data.batch_size, cfg.data.global_batch_size
        return dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else cfg.optim.epochs,
            batch_size=batch, global_batch_size=global_batch,
            lr=self.lr if self.lr is not None else cfg.optim.lr,
            arch=self.arch if self.arch is not None else cfg.model.arch,
        )

#: Config keys an expert depends on: the model keys minus the student's sampler/loss settings and
#: the student's epoch count (``experts.epochs``, resolved from ``optim.epochs`` when unset, counts
#: instead), plus the experts section.
_OPTIM_KEYS = tuple(f"optim.{f.name}" for f in dataclasses.fields(OptimConfig) if f.name != "epochs")
EXPERT_KEYS = tuple(k for k in MODEL_KEYS if (not k.startswith("train.") and k != "optim")
                    or k in ("train.grad_accum", "train.max_steps_per_epoch")) + _OPTIM_KEYS
# experts.global_batch_size is not a key: it enters through model_fingerprint_extra (only when set, so
# the fingerprints of configs without it are unchanged)
EXPERT_KEYS = EXPERT_KEYS + ("experts.convention", "experts.thresholds", "experts.epochs", "experts.batch_size",
                             "experts.lr", "experts.arch", "experts.sampler")


@dataclass(frozen=True)
class ExpertInfo:
    """A trained expert: its subset, model file, metrics (``val_top1`` etc.) and whether this call
    trained it (False: an earlier run's valid result was reused)."""

    subset: Subset
    model_path: Path
    metrics: dict[str, Any]
    trained: bool


def expert_subsets(cfg: Config, class_counts: Sequence[int]) -> list[Subset]:
    """The experts' subsets (many -> few) for these training counts; every one must be non-empty.

    Raises:
        ValueError: a subset has no class; the message names it, its count range and the counts.
    """
    e = cfg.experts
    subsets = split_classes(np.asarray(class_counts), e.convention, e.thresholds)
    for s in subsets:
        if len(s) == 0:
            raise ValueError(
                f"experts: subset {s.name!r} ({s.range_text()} training images per class) has no classes under "
                f"{describe_convention(e.convention, e.thresholds)}; class counts range "
                f"{int(np.min(class_counts))}..{int(np.max(class_counts))}. Set experts.thresholds to bounds "
                "that suit this dataset."
            )
    return subsets


def label_map(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Global class -> the expert's local label (``-1`` outside the subset)."""
    out = np.full(num_classes, -1, dtype=np.int64)
    out[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes), dtype=np.int64)
    return out


def _expert_batch_size(cfg: Config, k: int) -> int:
    """Expert ``k``'s per-process batch (``experts.batch_size``; with a global batch, filled in for the
    launch by :func:`lfme_fast.scale.resolve_world`)."""
    bs = cfg.experts.batch_size
    return int(bs[k]) if isinstance(bs, tuple) else int(bs)


def expert_batch_plan(ctx: RunContext, k: int, subset: Subset) -> Any:
    """Expert ``k``'s :class:`lfme_fast.scale.BatchPlan` on this launch.

    Raises:
        ConfigError: its global batch cannot be split over this launch's processes; the message names the
            subset, its number of training images and the world size.
    """
    from lfme_fast.config import ConfigError
    from lfme_fast.scale import BatchError, resolve_batch

    e = ctx.launch_cfg.experts
    pick = (lambda v: None if v is None else int(v[k]) if isinstance(v, tuple) else int(v))
    key = f"experts.global_batch_size[{k}]" if isinstance(e.global_batch_size, tuple) else "experts"
    n_images = int(np.isin(ctx.labels(ctx.cfg.data.train_split), subset.classes).sum())
    try:
        return resolve_batch(key, pick(e.batch_size), pick(e.global_batch_size), ctx.accelerator.num_processes,
                             ctx.cfg.train.grad_accum,
                             what=f"expert subset {subset.name!r}: {len(subset)} classes, {n_images} training images")
    except BatchError as exc:
        raise ConfigError(str(exc)) from None


def _subset_eval(ctx: RunContext, model: torch.nn.Module, split: str, subset: Subset) -> dict[str, Any]:
    """Top-1 of an expert on ``split``'s images of its subset, within the subset's label space."""

    labels = ctx.labels(split)
    present = np.intersect1d(np.unique(labels), subset.classes)
    if present.size == 0:
        return {"top1": None, "num_samples": 0}
    # Only the subset's images: a sampler over them (one epoch = each once; sharding pads, and
    # predict() drops the duplicates).
    sampler = ctx.build_sampler("subset", labels, 1, classes=present) if np.all(np.bincount(labels) > 0) else None
    loader = ctx.eval_loader(split, sampler)
    preds = predict(model, loader, ctx.accelerator, keep_logits=True)
    mask = np.isin(preds.labels, subset.classes)
    acc = subset_accuracy(preds.logits[mask], preds.labels[mask], subset.classes, local=True)
    return {"top1": acc, "num_samples": int(mask.sum())}


class _ExpertValHook(TrainHooks):
    """Adds ``val_top1`` (within the subset, on its val images) to every epoch record of an expert,
    so its run folder holds its validation curve (a collective; the model goes back to train mode)."""

    def __init__(self, ctx: RunContext, subset: Subset):
        self.ctx, self.subset = ctx, subset

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> dict[str, Any]:
        split = self.ctx.cfg.data.val_split
        if split is None:
            return {}
        top1 = _subset_eval(self.ctx, model, split, self.subset)["top1"]
        model.train()
        return {} if top1 is None else {"val_top1": top1}


def expert_fingerprint(ctx: RunContext, subset: Subset) -> str:
    """Fingerprint of one expert: config keys, its classes, the training data and process count."""
    return fingerprint(ctx.cfg, EXPERT_KEYS, {**ctx.model_fingerprint_extra(), "classes": subset.classes.tolist()})


def _expert_job(recipe: Recipe, k: int, subset: Subset) -> TrainJob:
    """The training stage of expert ``k`` (instance sampling within its subset, its own label space)."""
    ctx, cfg = recipe.ctx, recipe.cfg
    e = cfg.experts
    stage_dir = recipe.run_dir / "experts" / subset.name

    def build() -> TrainParts:
        sampler = ctx.build_sampler("subset", ctx.labels(cfg.data.train_split), e.epochs, classes=subset.classes,
                                    seed_offset=1000 * (k + 1))
        lmap = torch.as_tensor(label_map(subset.classes, ctx.num_classes), device=ctx.device)
        return TrainParts(model=ctx.build_model(len(subset), e.arch, seed_offset=1000 * (k + 1)),
                          loader=ctx.train_loader(sampler, e.epochs, _expert_batch_size(cfg, k),
                                                  batch_plan=expert_batch_plan(ctx, k, subset),
                                                  what=f"expert {subset.name!r}"),
                          loss_fn=lambda batch, logits: weighted_cross_entropy(logits, lmap[batch.labels]),
                          epochs=e.epochs, lr=e.lr, hooks=_ExpertValHook(ctx, subset))

    def finish(result) -> list[str]:
        metrics = _expert_metrics(ctx, subset, result)
        if recipe.accelerator.is_main_process:
            atomic_write_json(stage_dir / "metrics.json", metrics)
            recipe.console(f"expert {subset.name} ({len(subset)} classes): val top-1 {metrics.get('val_top1')}, "
                           f"test top-1 {metrics.get('test_top1')} (within the subset)")
        return ["metrics.json"]

    meta = {"subset": subset.to_json(), "arch": e.arch, "num_classes": len(subset),
            "model_kwargs": dict(cfg.model.kwargs)}
    return TrainJob(f"expert-{subset.name}", stage_dir, expert_fingerprint(ctx, subset), build, meta=meta,
                    finish=finish)


def _expert_metrics(ctx: RunContext, subset: Subset, result: Any) -> dict[str, Any]:
    """Val (and test) top-1 of a freshly trained expert on its subset's images (collective)."""
    cfg = ctx.cfg
    e = cfg.experts
    metrics: dict[str, Any] = {"subset": subset.to_json(), "arch": e.arch, "epochs": e.epochs,
                               "train_images": int(np.isin(ctx.labels(cfg.data.train_split), subset.classes).sum()),
                               "global_step": result.global_step,
                               "metric": "top-1 on the split's images of the subset, prediction within its classes"}
    for key, split in (("val", cfg.data.val_split), ("test", cfg.data.test_split if e.eval_test else None)):
        if split is not None:
            r = _subset_eval(ctx, result.model, split, subset)
            metrics[f"{key}_top1"] = r["top1"]
            metrics[f"{key}_samples"] = r["num_samples"]
            metrics[f"{key}_split"] = split
    return metrics


def train_experts(recipe: Recipe) -> list[ExpertInfo]:
    """Train (or reuse) one expert per subset for ``recipe``'s run; every process must call it.

    Returns one :class:`ExpertInfo` per subset, many -> few. Writes the layout in the module docstring.
    """
    ctx, run_dir = recipe.ctx, recipe.run_dir
    infos = []
    subsets = expert_subsets(recipe.cfg, ctx.train_counts)
    for k, subset in enumerate(subsets):  # every expert's batch layout, before the first one trains
        expert_batch_plan(ctx, k, subset)
    for k, subset in enumerate(subsets):
        job = _expert_job(recipe, k, subset)
        trained = recipe.train_stage(job) is not None
        metrics = json.loads((job.stage_dir / "metrics.json").read_text())
        infos.append(ExpertInfo(subset, job.stage_dir / "model.pt", metrics, trained=trained))
    if recipe.accelerator.is_main_process:
        summary = {"convention": describe_convention(recipe.cfg.experts.convention, recipe.cfg.experts.thresholds),
                   "experts": {i.subset.name: i.metrics for i in infos}}
        atomic_write_json(run_dir / "experts" / "summary.json", summary)
    recipe.accelerator.wait_for_everyone()
    return infos


def load_experts(run_dir: str | Path, cfg: Config, class_counts: Sequence[int] | None = None,
                 device: Any = "cpu") -> list[tuple[Subset, torch.nn.Module]]:
    """Load the trained experts of ``run_dir`` (many -> few), in eval mode on ``device``.

    ``class_counts`` (training counts) define the subsets; read from the dataset manifest when omitted.

    Raises:
        FileNotFoundError: an expert's model file is missing (run the experts stage first).
        ValueError: a saved expert's classes differ from the subset the config defines.
    """
    from lfme_fast.models import build_model

    if class_counts is None:
        from lfme_fast.shards import load_manifest

        class_counts = load_manifest(cfg.data.root)["splits"][cfg.data.train_split]["class_counts"]
    out = []
    for subset in expert_subsets(cfg, class_counts):
        path = Path(run_dir) / "experts" / subset.name / "model.pt"
        if not path.exists():
            raise FileNotFoundError(f"expert {subset.name!r} not found at {path}: run the 'experts' stage first")
        state, meta = load_model_file(path)
        saved = meta.get("subset", {}).get("classes")
        if saved != subset.classes.tolist():
            raise ValueError(f"{path}: trained on classes {saved}, but the config's subset {subset.name!r} is "
                             f"{subset.classes.tolist()} (experts.convention/thresholds changed?)")
        model = build_model(meta.get("arch", cfg.experts.arch), len(subset), **meta.get("model_kwargs", {}))
        model.load_state_dict(state)
        out.append((subset, model.to(device).eval()))
    return out


# ---------------------------------------------------------------------------------------------------
# LFME Fig. 2: experts vs one model on each subset
# ---------------------------------------------------------------------------------------------------


def compare_with_model(experts_run: str | Path, model_run: str | Path) -> dict[str, Any]:
    """Per subset: the expert's test top-1 against a full-label-space model's, both scored on the
    subset's test images (the model's prediction restricted to the subset's classes, and also its
    unrestricted accuracy). Subsets must match (same classes)."""
    summary = json.loads((Path(experts_run) / "experts" / "summary.json").read_text())
    model_metrics = json.loads((Path(model_run) / "metrics.json").read_text())
    counts = np.asarray(model_metrics["train_class_counts"])
    rows = {}
    for name, em in summary["experts"].items():
        classes = em["subset"]["classes"]
        mm = model_metrics["subsets"].get(name)
        model_classes = None
        if mm is not None:
            model_classes = [c for c in range(counts.size)
                             if (em["subset"]["lower"] is None or counts[c] >= em["subset"]["lower"])
                             and (em["subset"]["upper"] is None or counts[c] <= em["subset"]["upper"])]
        if mm is None or model_classes != classes:
            raise ValueError(f"subset {name!r} differs between {experts_run} (classes {classes}) and {model_run} "
                             f"(convention {model_metrics['convention']}): evaluate both with the same thresholds")
        rows[name] = {
            "classes": classes,
            "train_images_per_class": [int(counts[c]) for c in classes],
            "expert_top1": em.get("test_top1"),
            "model_top1_within_subset": mm.get("top1_within_subset"),
            "model_top1_full_label_space": mm.get("top1"),
            "test_images": em.get("test_samples"),
        }
        exp, mod = rows[name]["expert_top1"], rows[name]["model_top1_within_subset"]
        rows[name]["expert_minus_model"] = None if exp is None or mod is None else exp - mod
    return {"convention": summary["convention"], "experts_run": str(experts_run), "model_run": str(model_run),
            "experts_config": _run_summary(experts_run), "model_config": _run_summary(model_run),
            "metric": "test top-1 (fraction) on each subset's images; expert and model_top1_within_subset both "
                      "predict among the subset's classes only; model_top1_full_label_space predicts among all",
            "model_overall_top1": model_metrics.get("top1"), "subsets": rows}


def _run_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The settings of a run that matter when reading a comparison (from its RUN/config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    import yaml

    c = yaml.safe_load(path.read_text())
    return {"name": c["name"], "recipe": c["recipe"], "seed": c["seed"], "arch": c["model"]["arch"],
            "epochs": c["optim"]["epochs"], "batch_size": c["data"]["batch_size"], "lr": c["optim"]["lr"],
            "schedule": c["optim"]["schedule"], "sampler": c["train"]["sampler"], "loss": c["train"]["loss"],
            "augment": c["data"]["augment"], "backend": c["data"]["backend"],
            "experts": {k: c["experts"][k] for k in ("thresholds", "epochs", "batch_size", "lr", "arch")}
            if c["recipe"] != "baseline" else None}


class ExpertsRecipe(Recipe):
    """Train the LFME experts only (``RUN/experts/``); ``RUN/metrics.json`` summarises them."""

    STAGES = ("experts",)
    SECTIONS = {"experts": ExpertsConfig}

    def stage_experts(self) -> None:
        infos = train_experts(self)
        if self.accelerator.is_main_process:
            atomic_write_json(self.run_dir / "metrics.json",
                              {"experts": {i.subset.name: i.metrics for i in infos},
                               "world_size": self.accelerator.num_processes})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfme_fast.experts",
                                     description="Compare trained experts with a single model (LFME Fig. 2).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compare", help="per-subset test top-1: experts vs. one full-label-space model")
    p.add_argument("--experts", required=True, help="run folder holding experts/summary.json")
    p.add_argument("--model", required=True, help="run folder holding the model's metrics.json")
    p.add_argument("--out", help="write the comparison JSON here")
    p.add_argument("--note", help="free text stored with the result (e.g. how long the runs took)")
    args = parser.parse_args(argv)
    result = compare_with_model(args.experts, args.model)
    if args.note:
        result["note"] = args.note
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
