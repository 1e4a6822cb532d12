"""Recipes as plug-ins: a recipe written here, in the test file, registers and runs end to end through
the command line with its own config section, stages, skipping and evaluation, without any change to
the package."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from lfme_fast.config import Check, Config, ConfigError, load_config
from lfme_fast.losses import LossParts, weighted_cross_entropy
from lfme_fast.recipes import RECIPES, RecipeNotFound, get_recipe, register_recipe
from lfme_fast.recipes.base import Recipe, TrainJob, TrainParts

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ToyConfig:
    """The toy recipe's own section: a label-smoothing amount and a flag the eval reports."""

    smoothing: float = 0.1
    note: str = "toy"

    def resolve(self, cfg: Config, check: Check) -> "ToyConfig":
        check(0.0 <= self.smoothing < 1.0, "toy.smoothing", f"must be in [0, 1), got {self.smoothing}")
        return self


class ToyRecipe(Recipe):
    """Label-smoothed CE on class-balanced batches: stages ``fit`` then ``eval``."""

    STAGES = ("fit", "eval")
    SECTIONS = {"toy": ToyConfig}

    @property
    def fit_dir(self) -> Path:
        return self.run_dir / "fit"

    def fit_fingerprint(self) -> str:
        from lfme_fast.config import fingerprint
        from lfme_fast.trainer import MODEL_KEYS

        return fingerprint(self.cfg, MODEL_KEYS + ("toy",), self.ctx.model_fingerprint_extra())

    def _parts(self) -> TrainParts:
        cfg, ctx = self.cfg, self.ctx
        sampler = ctx.build_sampler("class_balanced", ctx.labels(cfg.data.train_split), cfg.optim.epochs)
        eps = cfg.toy.smoothing

        def loss(batch, logits):
            ce = torch.nn.functional.cross_entropy(logits.float(), batch.labels, label_smoothing=eps)
            return LossParts(ce, {"ce_plain": weighted_cross_entropy(logits, batch.labels).loss.detach()})

        return TrainParts(model=ctx.build_model(ctx.num_classes), loader=ctx.train_loader(sampler, cfg.optim.epochs),
                          loss_fn=loss)

    def stage_fit(self) -> None:
        self.train_stage(TrainJob("fit", self.fit_dir, self.fit_fingerprint(), self._parts,
                                  meta={"arch": self.cfg.model.arch}))

    def stage_eval(self) -> None:
        self.eval_stage(model_dir=self.fit_dir, model_fp=self.fit_fingerprint(), model_stage="fit",
                        recipe_info={"smoothing": self.cfg.toy.smoothing, "note": self.cfg.toy.note},
                        title="toy recipe")


def toy_yaml(tmp_path: Path, fmnist_dir: Path, recipe: str, **toy) -> Path:
    """The smoke config turned into a toy-recipe config (common sections + ``toy``)."""
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw.update(recipe=recipe, stages=None, toy={"smoothing": 0.2, **toy})
    raw["data"].update(root=str(fmnist_dir), test_split="val")
    raw["train"]["checkpoint_every_steps"] = None
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def toy_registered():
    register_recipe("toy", ToyRecipe)
    yield
    RECIPES.pop("toy", None)


def test_toy_recipe_runs_through_the_cli(fmnist_dir, tmp_path, toy_registered):
    from lfme_fast.train import main

    path = toy_yaml(tmp_path, fmnist_dir, "toy")
    out = tmp_path / "run"
    assert main(["--config", str(path), "--output-dir", str(out), "toy.note=hello"]) == 0
    for rel in ("config.yaml", "fit/model.pt", "fit/done.json", "fit/log.jsonl", "eval/done.json", "metrics.json"):
        assert (out / rel).exists(), rel
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["toy"] == {"smoothing": 0.2, "note": "hello"} and "lfme" not in saved
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == {"name": "toy", "smoothing": 0.2, "note": "hello"}
    steps = [json.loads(line) for line in (out / "fit" / "log.jsonl").read_text().splitlines()]
    assert any("ce_plain" in r for r in steps if r.get("event") == "step")
    # the shared machinery skips both finished stages on a second run
    before = (out / "fit" / "model.pt").stat().st_mtime_ns
    main(["--config", str(path), "--output-dir", str(out), "toy.note=hello"])
    assert (out / "fit" / "model.pt").stat().st_mtime_ns == before
    # a changed section value is a new fingerprint: the stage trains again
    main(["--config", str(path), "--output-dir", str(out), "toy.note=hello", "toy.smoothing=0.0"])
    assert (out / "fit" / "model.pt").stat().st_mtime_ns != before


def test_toy_recipe_by_import_path_in_a_new_process(fmnist_dir, tmp_path):
    # No registration at all: the config names the class, the CLI imports it.
    path = toy_yaml(tmp_path, fmnist_dir, "tests.test_recipes:ToyRecipe")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "lfme_fast/train.py", "--config", str(path), "--output-dir", str(out),
                          "stages=[fit]", "optim.epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "fit" / "done.json").exists() and not (out / "eval").exists()


def test_toy_section_is_validated_and_owned(fmnist_dir, tmp_path, toy_registered):
    path = toy_yaml(tmp_path, fmnist_dir, "toy")
    with pytest.raises(ConfigError, match=r"toy.smoothing: must be in \[0, 1\), got 1.5 \(override 'toy.smoothing=1.5'\)"):
        load_config(path, ["toy.smoothing=1.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'toy.smooth' \(file .*toy.yaml\)"):
        raw = yaml.safe_load(path.read_text())
        raw["toy"]["smooth"] = 1
        path.write_text(yaml.safe_dump(raw))
        load_config(path)
    # the toy section is the toy recipe's only: a baseline config may not carry it
    with pytest.raises(ConfigError, match=r"unknown key 'toy'.*belongs to recipe\(s\) toy"):
        load_config(REPO / "configs" / "smoke.yaml", ["toy.note=x"])


def test_registry_rejects_bad_recipes():
    class NoStageMethod(Recipe):
        STAGES = ("fit",)

    with pytest.raises(RecipeNotFound, match="no method stage_fit"):
        register_recipe("bad", NoStageMethod)
    with pytest.raises(RecipeNotFound, match="unknown recipe 'nope'"):
        get_recipe("nope")
    with pytest.raises(RecipeNotFound, match="cannot be loaded"):
        get_recipe("no.such.module:Thing")
    assert get_recipe("lfme").STAGES == ("experts", "offline", "student", "eval")
