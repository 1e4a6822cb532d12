"""End-to-end recipes on the real (tiny) Fashion-MNIST-LT fixture: run-folder layout, stage skipping,
losses, samplers, experts, the CLI entry points and the LR schedule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lfme_fast.config import config_from_dict, load_config
from lfme_fast.logging_utils import read_jsonl
from lfme_fast.train import run

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def smoke_cfg(root: Path, out: Path, *extra: str):
    """The smoke config on the fixture (which has no test split: val stands in), without mid-epoch
    checkpoints unless asked."""
    return load_config(SMOKE, [f"data.root={root}", f"output_dir={out}", "data.test_split=val",
                               "train.checkpoint_every_steps=null", *extra])


def events(path: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(path) if r.get("event") == kind]


def test_smoke_run_layout_and_skip(fmnist_dir, tmp_path):
    out = tmp_path / "run"
    cfg = smoke_cfg(fmnist_dir, out)
    run(cfg)
    for rel in ("config.yaml", "train/model.pt", "train/log.jsonl", "train/done.json", "eval/done.json",
                "metrics.json", "metrics.md", "per_class_accuracy.png"):
        assert (out / rel).exists(), rel
    assert not (out / "train" / "checkpoints").exists()  # removed once the stage is done
    assert load_config(out / "config.yaml") == cfg

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["num_samples"] == 50
    assert "custom thresholds 1000,200" in metrics["convention"]
    assert set(metrics["subsets"]) == {"many", "medium", "few"}
    assert len(metrics["per_class_top1"]) == 10 and 0.0 <= metrics["top1"] <= 1.0
    assert "val" not in metrics  # val == test split here
    assert (out / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["convention"] in (out / "metrics.md").read_text()

    epochs = events(out / "train" / "log.jsonl", "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(e["world_size"] == 1 and e["samples"] == 4 * 64 for e in epochs)
    # the validation curve: every epoch scored on data.val_split
    assert all(0.0 <= e["val_top1"] <= 1.0 and 0.0 <= e["val_mean_class_top1"] <= 1.0 for e in epochs)
    steps = events(out / "train" / "log.jsonl", "step")
    assert [s["global_step"] for s in steps] == list(range(1, 9))
    assert all(np.isfinite(s["loss"]) for s in steps)

    # Same config again: both stages are up to date and skipped (nothing rewritten).
    before = {p: p.stat().st_mtime_ns for p in (out / "train" / "model.pt", out / "metrics.json")}
    run(cfg)
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # An eval-only change re-runs eval, not train.
    run(smoke_cfg(fmnist_dir, out, "eval.convention=strict", "eval.thresholds=null"))
    assert (out / "train" / "model.pt").stat().st_mtime_ns == before[out / "train" / "model.pt"]
    assert json.loads((out / "metrics.json").read_text())["convention"].startswith("strict")


@pytest.mark.parametrize("extra", [
    ("train.loss=balanced_softmax", "train.sampler=class_balanced"),
    ("train.loss=logit_adjusted", "train.tau=1.5", "train.sampler=sqrt"),
    ("train.sampler=progressive", "train.grad_accum=2", "optim.schedule=step", "optim.milestones=[1]",
     "optim.warmup_epochs=0.5"),
], ids=["balanced_softmax+cb", "logit_adjusted+sqrt", "progressive+accum+step"])
def test_baseline_variants_train(fmnist_dir, tmp_path, extra):
    out = tmp_path / "run"
    run(smoke_cfg(fmnist_dir, out, "stages=[train]", "train.max_steps_per_epoch=2", *extra))
    steps = events(out / "train" / "log.jsonl", "step")
    assert len(steps) == 4 and all(np.isfinite(s["loss"]) for s in steps)
    if "train.grad_accum=2" in extra:
        assert events(out / "train" / "log.jsonl", "epoch")[0]["samples"] == 2 * 2 * 64
    assert (out / "train" / "model.pt").exists() and not (out / "metrics.json").exists()


def test_eval_needs_trained_model(fmnist_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the 'train' stage first"):
        run(smoke_cfg(fmnist_dir, tmp_path / "run", "stages=[eval]"))


def test_pretrained_checkpoint_is_loaded(fmnist_dir, tmp_path):
    from lfme_fast.models import build_model

    torch.manual_seed(123)
    src = build_model("resnet_small28", 10)
    torch.save(src.state_dict(), tmp_path / "init.pt")
    out = tmp_path / "run"
    # lr 0 keeps the weights, momentum 0 and no decay keep them exactly: the saved model must equal the init
    run(smoke_cfg(fmnist_dir, out, "stages=[train]", f"model.pretrained={tmp_path / 'init.pt'}",
                  "optim.schedule=constant", "optim.weight_decay=0", "optim.momentum=0", "optim.lr=1e-30",
                  "train.max_steps_per_epoch=1"))
    from lfme_fast.checkpoint import load_model_file

    state, _ = load_model_file(out / "train" / "model.pt")
    assert torch.allclose(state["conv1.weight"], src.state_dict()["conv1.weight"])


# ---------------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------------


def test_experts_train_save_load(fmnist_dir, tmp_path):
    from lfme_fast.recipes.experts import ExpertsRecipe, label_map, load_experts, train_experts

    out = tmp_path / "run"
    cfg = smoke_cfg(fmnist_dir, out, "recipe=experts", "stages=[experts]", "experts.thresholds=[100, 30]",
                    "experts.epochs=1", "experts.batch_size=[32, 16, 8]", "train.max_steps_per_epoch=2")
    recipe = ExpertsRecipe(cfg)
    recipe.setup()
    infos = train_experts(recipe)
    counts = np.asarray(json.loads((fmnist_dir / "manifest.json").read_text())["splits"]["train"]["class_counts"])
    assert [i.subset.name for i in infos] == ["many", "medium", "few"]
    assert np.array_equal(np.concatenate([i.subset.classes for i in infos]), np.arange(10))
    for info in infos:
        d = out / "experts" / info.subset.name
        assert (d / "model.pt").exists() and (d / "done.json").exists()
        m = json.loads((d / "metrics.json").read_text())
        assert m["subset"]["classes"] == info.subset.classes.tolist()
        assert 0.0 <= m["val_top1"] <= 1.0 and m["val_samples"] == 5 * len(info.subset)
        assert m["train_images"] == int(counts[info.subset.classes].sum())
        steps = events(d / "log.jsonl", "step")
        assert len(steps) == 2
    assert json.loads((out / "experts" / "summary.json").read_text())["experts"].keys() == {"many", "medium", "few"}

    loaded = load_experts(out, cfg)
    for (subset, model), info in zip(loaded, infos):
        assert subset.name == info.subset.name
        assert model(torch.zeros(2, 3, 28, 28)).shape == (2, len(subset))

    # a second call reuses every finished expert
    again = train_experts(recipe)
    assert not any(i.trained for i in again)

    lm = label_map(np.array([2, 5, 7]), 10)
    assert lm.tolist() == [-1, -1, 0, -1, -1, 1, -1, 2, -1, -1]


def test_experts_reject_empty_subset(fmnist_dir, tmp_path):
    from lfme_fast.experts import expert_subsets

    cfg = smoke_cfg(fmnist_dir, tmp_path, "recipe=experts", "stages=null", "experts.thresholds=[100000, 50000]")
    with pytest.raises(ValueError, match=r"subset 'many' \(>= 100000.*has no classes"):
        expert_subsets(cfg, [374, 10, 4])


def test_experts_recipe_and_load_mismatch(fmnist_dir, tmp_path):
    from lfme_fast.experts import load_experts

    out = tmp_path / "run"
    cfg = smoke_cfg(fmnist_dir, out, "recipe=experts", "stages=[experts]", "experts.thresholds=[100]",
                    "experts.epochs=1", "train.max_steps_per_epoch=1", "experts.batch_size=16", "data.val_split=null")
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["experts"]) == {"many", "few"}  # L = 2 subsets
    assert "val_top1" not in metrics["experts"]["many"] and "test_top1" in metrics["experts"]["many"]
    other = smoke_cfg(fmnist_dir, out, "recipe=experts", "stages=null", "experts.thresholds=[50]")
    with pytest.raises(ValueError, match="trained on classes"):
        load_experts(out, other)


def test_compare_experts_with_model(tmp_path):
    from lfme_fast.experts import compare_with_model

    exp, mod = tmp_path / "e", tmp_path / "m"
    (exp / "experts").mkdir(parents=True)
    mod.mkdir()
    subsets = {"many": {"classes": [0], "lower": 100, "upper": None},
               "few": {"classes": [1, 2], "lower": None, "upper": 99}}
    (exp / "experts" / "summary.json").write_text(json.dumps({"convention": "custom", "experts": {
        k: {"subset": v, "test_top1": 0.9, "test_samples": 10} for k, v in subsets.items()}}))
    (mod / "metrics.json").write_text(json.dumps({"convention": "custom", "top1": 0.5,
                                                  "train_class_counts": [500, 50, 5], "subsets": {
        "many": {"top1": 0.95, "top1_within_subset": 1.0}, "few": {"top1": 0.2, "top1_within_subset": 0.6}}}))
    res = compare_with_model(exp, mod)
    assert res["subsets"]["few"]["expert_minus_model"] == pytest.approx(0.3)
    assert res["subsets"]["many"]["train_images_per_class"] == [500]
    (mod / "metrics.json").write_text(json.dumps({"convention": "other", "train_class_counts": [500, 500, 5],
                                                  "subsets": {"many": {}, "few": {}}}))
    with pytest.raises(ValueError, match="differs"):
        compare_with_model(exp, mod)


# ---------------------------------------------------------------------------------------------------
# CLI and schedule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", [["lfme_fast/train.py"], ["-m", "lfme_fast.train"]], ids=["path", "module"])
def test_cli_entry_points(launcher, tmp_path):
    cmd = [sys.executable, *launcher, "--config", "configs/smoke.yaml", "--print-config", "optim.lr=0.2",
           "--output-dir", str(tmp_path / "x")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "lr: 0.2" in res.stdout and f"output_dir: {tmp_path / 'x'}" in res.stdout
    if launcher[0] == "-m":
        return
    bad = subprocess.run([sys.executable, *launcher, "--config", "configs/smoke.yaml", "optim.lrr=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown key 'optim.lrr'" in bad.stderr


def test_lr_schedule():
    from lfme_fast.trainer import LRSchedule

    o = config_from_dict({"name": "x", "optim": {"epochs": 4, "schedule": "cosine", "warmup_epochs": 1}}).optim
    f = LRSchedule(o, steps_per_epoch=10, epochs=4)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(25) == pytest.approx(0.5) and f(40) == pytest.approx(0.0)
    o = config_from_dict({"name": "x", "optim": {"epochs": 6, "schedule": "step", "milestones": [2, 4],
                                                 "gamma": 0.1}}).optim
    f = LRSchedule(o, steps_per_epoch=5, epochs=6)
    assert [f(s) for s in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    o = config_from_dict({"name": "x", "optim": {"epochs": 2, "schedule": "constant"}}).optim
    assert LRSchedule(o, 3, 2)(5) == 1.0


def test_bench_train_runs(tmp_path):
    from lfme_fast.bench.train import main

    main(["--cases", "resnet32@32", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--devices", "cpu",
          "--cpu-precisions", "fp32", "--json-out", str(tmp_path / "b.json")])
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["results"][0]["samples_per_s"] > 0 and "machine" in res
