"""The LFME student: stored teacher logits give the live teacher's loss and gradients, views replay
exactly, SpES/SpIS follow the schedules, and the whole recipe runs end to end on Fashion-MNIST-LT."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lfme_fast.config import load_config
from lfme_fast.loaders import LoaderOptions, build_loader
from lfme_fast.losses import lfme_loss
from lfme_fast.models import build_model
from lfme_fast.sampling import ClassBalancedSampler
from lfme_fast.schedules import expert_weight, initial_instance_weights, mean_shots_per_subset
from lfme_fast.shards import ShardReader
from lfme_fast.recipes.lfme import SpESHook, StudentLoss, mean_weight_per_subset, spis_initial_weights
from lfme_fast.subsets import Subset

from test_offline import SUBSETS, build_store

REPO_CONFIG = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def subsets() -> list[Subset]:
    return [Subset(name, np.asarray(c), None, None) for name, c in SUBSETS]


@pytest.fixture(scope="module")
def store3(fmnist_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_student")
    store, header, experts = build_store(fmnist_dir, run_dir, views=3, seed=7)
    return store, experts


def train_batch(root, store, epoch=1, batch_size=96, weights=None):
    labels = ShardReader(root, "train").labels
    sampler = ClassBalancedSampler(labels, samples_per_class=4, seed=3, initial_weights=weights)
    loader = build_loader(LoaderOptions(root, "train", backend="torch", train=True, batch_size=batch_size,
                                        sampler=sampler, total_epochs=3, views=store.views, num_workers=0))
    loader.set_epoch(epoch)
    return next(iter(loader))


def test_views_replay_exactly(fmnist_dir, store3):
    store, _ = store3
    batch = train_batch(fmnist_dir, store)
    assert len(set(batch.views.tolist())) == 3  # the batch mixes all stored views
    n = store.num_samples
    for k in range(3):
        fixed = build_loader(LoaderOptions(fmnist_dir, "train", backend="torch", train=False, batch_size=n,
                                           views=store.views, fixed_view=k, num_workers=0))
        fixed.set_epoch(0)
        images = next(iter(fixed)).images
        sel = batch.views == k
        assert torch.equal(batch.images[sel], images[batch.indices[sel]])  # pixel-exact replay


@pytest.mark.parametrize("spis", ["paper", "official"])
def test_stored_logits_match_live_teachers(fmnist_dir, store3, spis):
    """Same batch, same views: loss and student gradients from the float16 store equal those from live
    expert forwards (to float16 rounding of the teacher logits)."""
    store, experts = store3
    labels = ShardReader(fmnist_dir, "train").labels
    v1 = spis_initial_weights(spis, store.confidence, labels, subsets(), np.bincount(labels))
    batch = train_batch(fmnist_dir, store, weights=v1)
    assert batch.weights is not None and not torch.all(batch.weights == 1)
    w = [1.0, 0.5, 0.25]
    loss_fn = StudentLoss(store, subsets(), spis, True, 2.0, False, lambda: w, "cpu")

    def run(teachers):
        torch.manual_seed(0)
        student = build_model("resnet_small28", 10)
        logits = loss_fn.forward(student, batch)
        if teachers is None:
            parts = loss_fn(batch, logits)  # the recipe's path: teachers gathered from the store
        else:
            ce_w = batch.weights if spis == "paper" else None
            parts = lfme_loss(logits, batch.labels, ce_w, teachers, [s.classes for s in subsets()], w, 2.0)
        parts.loss.backward()
        return parts, [p.grad.clone() for p in student.parameters()]

    with torch.no_grad():
        live = [e.model(batch.images) for e in experts]
    stored_parts, stored_grads = run(None)
    live_parts, live_grads = run(live)
    torch.testing.assert_close(stored_parts.loss, live_parts.loss, rtol=1e-3, atol=1e-4)
    for a, b in zip(stored_parts["kd_per_expert"], live_parts["kd_per_expert"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)
    for ga, gb in zip(stored_grads, live_grads):
        torch.testing.assert_close(ga, gb, rtol=5e-3, atol=1e-4)
    # the fp16 store is not trivially equal to fp32: this is a rounding-level comparison
    gathered = store.teachers(batch.indices, batch.views)
    assert max(float((g.float() - l).abs().max()) for g, l in zip(gathered, live)) < 2e-2


def test_official_spis_scales_logits():
    store = None
    batch = SimpleNamespace(images=torch.randn(4, 3, 28, 28), labels=torch.tensor([0, 4, 7, 9]),
                            weights=torch.tensor([0.5, 1.0, 1.5, 2.0]), indices=torch.arange(4), views=None)
    torch.manual_seed(0)
    model = build_model("resnet_small28", 10).eval()
    fn = StudentLoss(store, subsets(), "official", False, 2.0, False, lambda: [1, 1, 1], "cpu")
    out = fn.forward(model, batch)
    torch.testing.assert_close(out, model(batch.images) * batch.weights[:, None])
    paper = StudentLoss(store, subsets(), "paper", False, 2.0, False, lambda: [1, 1, 1], "cpu")
    torch.testing.assert_close(paper.forward(model, batch), model(batch.images))
    with pytest.raises(ValueError, match="offline store"):
        StudentLoss(None, subsets(), "paper", True, 2.0, False, lambda: [1, 1, 1], "cpu")


def test_spes_weights_follow_expert_weight():
    logits = torch.tensor([[5.0, 0, 0, 0, 0, 0, 0, 0, 0, 9.0],   # class 0: right within many, wrong overall
                           [0, 5.0, 0, 0, 0, 0, 0, 0, 0, 0],     # class 1: right
                           [0, 0, 0, 0, 5.0, 0, 0, 0, 0, 0],     # class 4: right
                           [0, 0, 0, 0, 0, 0, 0, 5.0, 0, 0]])    # class 8: wrong
    labels = torch.tensor([0, 1, 4, 8])
    expert_acc = [0.9, 0.8, None]
    matched = SpESHook("matched", 0.6, subsets(), expert_acc, None, None)
    official = SpESHook("official", 0.6, subsets(), expert_acc, None, None)
    acc_m = matched.student_accuracies(logits, labels)
    acc_o = official.student_accuracies(logits, labels)
    assert acc_m[:3] == [1.0, 1.0, 0.0] and acc_o[:3] == [0.5, 1.0, 0.0]
    assert matched.update(acc_m) == [expert_weight(1.0, 0.9, 0.6), expert_weight(1.0, 0.8, 0.6), 1.0]
    assert official.update(acc_o) == [expert_weight(0.5, 0.9, 0.6), expert_weight(1.0, 0.8, 0.6), 1.0]
    assert official.update([0.63, 0.2, 0.3])[0] == pytest.approx((0.9 - 0.63) / (0.9 * 0.4))
    assert official.update([math.nan, 0.2, 0.3])[0] == 1.0
    # on_epoch_end: the weights it logs as used are the previous ones; the update applies next epoch
    hook = SpESHook("matched", 0.6, subsets(), expert_acc, lambda m: (logits, labels), lambda e: {"many": 0.5})
    rec = hook.on_epoch_end(0, None)
    assert rec["lfme_w"] == {"many": 1.0, "medium": 1.0, "few": 1.0}
    assert rec["lfme_w_next"]["many"] == expert_weight(1.0, 0.9, 0.6) == hook.weights[0]
    hook2 = SpESHook("matched", 0.6, subsets(), expert_acc, None, None)
    hook2.load_state_dict(hook.state_dict())
    assert hook2.weights == hook.weights


def test_spis_weights_and_means():
    labels = np.array([0, 0, 1, 4, 5, 7, 9, 9])
    counts = np.array([100, 100, 100, 100, 30, 30, 30, 5, 5, 5])
    p = np.linspace(0.2, 0.9, labels.size)
    v1 = spis_initial_weights("paper", p, labels, subsets(), counts)
    sub_of_class = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_allclose(v1, initial_instance_weights(p, labels, sub_of_class,
                                                            mean_shots_per_subset(counts, sub_of_class)))
    assert spis_initial_weights("off", p, labels, subsets(), counts) is None
    means = mean_weight_per_subset("paper", "linear", v1, labels, subsets(), 0, 5)
    assert means["many"] == pytest.approx(v1[:3].mean())
    assert mean_weight_per_subset("paper", "linear", v1, labels, subsets(), 4, 5) == {"many": 1.0, "medium": 1.0,
                                                                                    "few": 1.0}
    official = mean_weight_per_subset("official", "linear", v1, labels, subsets(), 4, 5)
    assert official["many"] > 1.0  # the official ramp is not clamped


def test_lfme_recipe_end_to_end(fmnist_dir, tmp_path):
    from lfme_fast.logging_utils import read_jsonl
    from lfme_fast.train import run

    out = tmp_path / "run"
    cfg = load_config(REPO_CONFIG / "fmnist_lt" / "lfme.yaml", [
        f"data.root={fmnist_dir}", f"output_dir={out}", "data.test_split=val", "data.batch_size=64",
        "experts.thresholds=[100, 20]", "eval.thresholds=[100, 20]", "experts.epochs=1",
        "experts.batch_size=[32, 16, 8]", "optim.epochs=2", "train.max_steps_per_epoch=2", "lfme.views=2",
        "log.progress=false", "experts.eval_test=false"])
    run(cfg)
    for rel in ("metrics.json", "metrics.md", "spes_weights.png", "spis_schedules.png", "student/model.pt",
                "offline/header.json", "offline/confidence.npy", "experts/few/model.pt", "lfme_summary.json"):
        assert (out / rel).exists(), rel
    assert (out / "spes_weights.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["name"] == "lfme" and 0.0 <= metrics["top1"] <= 1.0
    assert set(metrics["subsets"]) == {"many", "medium", "few"}
    assert metrics["lfme"]["offline_bytes_per_image"] == pytest.approx(2 * 2 * 10)
    epochs = [r for r in read_jsonl(out / "student" / "log.jsonl") if r.get("event") == "epoch"]
    assert len(epochs) == 2
    first, second = epochs
    assert first["lfme_w"] == {"many": 1.0, "medium": 1.0, "few": 1.0}
    assert second["lfme_w"] == first["lfme_w_next"]
    for name in ("many", "medium", "few"):
        want = expert_weight(first["lfme_acc_student"][name], first["lfme_acc_expert"][name], 0.6)
        assert first["lfme_w_next"][name] == pytest.approx(want)
    assert second["lfme_v_mean"]["few"] == pytest.approx(1.0)  # linear schedule ends at exactly 1
    assert first["lfme_v_mean"]["many"] < first["lfme_v_mean"]["few"]
    # a second run skips every stage
    before = (out / "student" / "model.pt").stat().st_mtime_ns
    run(cfg)
    assert (out / "student" / "model.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("path", sorted(p for p in REPO_CONFIG.rglob("*.yaml") if "recipe: lfme" in p.read_text()),
                         ids=lambda p: p.relative_to(REPO_CONFIG).as_posix())
def test_lfme_configs_resolve(path):
    from lfme_fast.recipes import get_recipe

    cfg = load_config(path)
    assert get_recipe(cfg.recipe).STAGES == ("experts", "offline", "student", "eval")
    assert cfg.lfme.temperature == 2.0 and cfg.lfme.samples_per_class == 4
    # LFME's student samples class-balanced; only the Table 3 "instance sampling" rows do not
    assert cfg.train.sampler == ("instance" if "ablation_instance" in path.name else "class_balanced")
    if "inat18" in str(path):
        assert cfg.lfme.topk is not None  # 8,142 classes: top-k store


def test_ablation_runner_shares_experts_and_store(fmnist_dir, tmp_path):
    from lfme_fast.ablations import run_ablations

    out = tmp_path / "abl"
    overrides = ["data.test_split=val", "data.batch_size=32", "experts.thresholds=[100, 20]",
                 "eval.thresholds=[100, 20]", "experts.epochs=1", "experts.batch_size=[16, 8, 4]", "optim.epochs=1",
                 "train.max_steps_per_epoch=1", "log.progress=false", "experts.eval_test=false"]
    report = run_ablations(fmnist_dir, out, [0], overrides, ["balanced", "balanced_kd_spes_spis"], log=lambda m: None)
    assert set(report["rows"]) == {"balanced", "balanced_kd_spes_spis"}
    for key in report["rows"]:
        run_dir = out / "seed0" / key
        assert (run_dir / "experts").is_symlink() and (run_dir / "offline").is_symlink()
        assert not (run_dir / "offline.partial").exists()
    # the store was written once, in the shared folder, and both rows used it
    assert (out / "seed0" / "shared" / "offline" / "header.json").exists()
    table = (out / "ablations.md").read_text()
    assert "| Class-balanced sampling |" in table and "| SpIS + KD + SpES (LFME) |" in table
    assert "1 seed (0)" in table


def test_ablation_table_mean_std():
    from lfme_fast.ablations import format_table

    rows = {"balanced": {0: {"many": 0.5, "medium": 0.2, "few": None, "overall": 0.4},
                         1: {"many": 0.7, "medium": 0.4, "few": None, "overall": 0.6}}}
    table = format_table(rows, [0, 1], "lfme")
    assert "| Class-balanced sampling | 60.00 ± 14.14 | 30.00 ± 14.14 | – | 50.00 ± 14.14 |" in table
    assert "mean ± std over 2 seeds" in table


def test_two_process_lfme_store_equals_single_process(fmnist_dir, tmp_path, free_port):
    """A real 2-process CPU job (gloo, accelerate launch) runs the whole recipe; each rank writes its
    share of the store's rows, and the result is bit-identical to a single-process pass."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from lfme_fast.train import run

    repo = Path(__file__).resolve().parents[1]
    common = [f"data.root={fmnist_dir}", "data.test_split=val", "data.batch_size=32", "experts.thresholds=[100, 20]",
              "eval.thresholds=[100, 20]", "experts.epochs=1", "experts.batch_size=[16, 8, 4]", "optim.epochs=1",
              "train.max_steps_per_epoch=2", "lfme.views=2", "log.progress=false", "experts.eval_test=false"]
    dist = tmp_path / "dist"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "lfme_fast/train.py", "--config",
           "configs/fmnist_lt/lfme.yaml", "--output-dir", str(dist), *common]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((dist / "metrics.json").read_text())["world_size"] == 2

    single = tmp_path / "single"
    shutil.copytree(dist / "experts", single / "experts")
    run(load_config(REPO_CONFIG / "fmnist_lt" / "lfme.yaml", [*common, f"output_dir={single}", "stages=[offline]"]))
    for name in ("expert0.logits.npy", "expert1.logits.npy", "expert2.logits.npy", "confidence.npy"):
        a, b = (dist / "offline" / name).read_bytes(), (single / "offline" / name).read_bytes()
        assert a == b, name
    from lfme_fast.augment import FixedViews

    va, vb = FixedViews.load(dist / "offline" / "views.npz"), FixedViews.load(single / "offline" / "views.npz")
    assert np.array_equal(va.boxes, vb.boxes) and np.array_equal(va.flips, vb.flips)
