"""The ``ecl`` recipe end to end on the tiny Fashion-MNIST-LT fixture: ``configs/smoke_ecl.yaml`` through
the command line on 1 and on 2 processes and resumed mid-epoch to the same losses and the same accuracy
EMA; per-expert metrics, the switches change the logged loss parts, a 2-expert model with shared stages
trains; config errors name the key.

Runs are kept to a few steps of small batches (the point is the machinery, not accuracy)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lfme_fast.checkpoint import find_latest, load_checkpoint_state, load_model_file
from lfme_fast.config import ConfigError, load_config
from lfme_fast.evaluate import Predictions
from lfme_fast.logging_utils import read_jsonl
from lfme_fast.recipes import get_recipe, run
from lfme_fast.recipes.ecl import (
    ECLConfig,
    ECLLoss,
    ECLRecipe,
    _stacked_label_logits,
    ensemble_predictions,
)
from lfme_fast.trainer import InterruptAfter, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
ECL_YAML = REPO / "configs" / "fmnist_lt" / "ecl.yaml"
#: The tiny CPU run the end-to-end, 2-process and resume tests use (2 epochs x 3 steps of 32, checkpoints
#: every 2 steps), as a user runs it: ``python lfme_fast/train.py --config configs/smoke_ecl.yaml ...``.
SMOKE_ECL = REPO / "configs" / "smoke_ecl.yaml"
# The fixture has ~930 training images (374..4 per class): these thresholds give three non-empty subsets.
SUBSETS = ["eval.thresholds=[100, 20]"]
#: Loss terms logged with every component on.
ON_TERMS = ("bs", "kd", "feat", "con")


def ecl_cfg(root: Path, out: Path, *extra: str):
    return load_config(ECL_YAML, [
        f"data.root={root}", f"output_dir={out}", "data.test_split=val", "data.batch_size=16",
        "data.eval_batch_size=256", "optim.epochs=1", "train.max_steps_per_epoch=2", "train.log_every=1",
        "log.progress=false", *SUBSETS, *extra])


def smoke_args(root: Path, *extra: str) -> list[str]:
    """Overrides of the smoke config for the fixture (no test split: val stands in; its subsets)."""
    return [f"data.root={root}", "data.test_split=val", *SUBSETS, *extra]


def smoke_cfg(root: Path, out: Path, *extra: str):
    return load_config(SMOKE_ECL, [*smoke_args(root, *extra), f"output_dir={out}"])


def step_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "train" / "log.jsonl") if r["event"] == "step"]


def epoch_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "train" / "log.jsonl") if r["event"] == "epoch"]


def test_registered_and_configs_resolve():
    assert get_recipe("ecl") is ECLRecipe and ECLRecipe.STAGES == ("train", "eval")
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "recipe: ecl" in path.read_text():
            cfg = load_config(path)
            assert cfg.train.loss == "balanced_softmax" and cfg.ecl.num_experts == 3, path
            assert cfg.ecl.kd and cfg.ecl.feature_kd and cfg.ecl.contrastive, path
            assert cfg.ecl.reweight == ("no_reweight" not in path.name), path


def test_smoke_ecl_end_to_end_through_the_command_line(fmnist_dir, tmp_path):
    from lfme_fast.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--config", str(SMOKE_ECL), *smoke_args(fmnist_dir), "--output-dir", str(out)]) == 0
    cfg = smoke_cfg(fmnist_dir, out)
    assert load_config(out / "config.yaml") == cfg
    for rel in ("config.yaml", "train/model.pt", "train/done.json", "metrics.json", "metrics.md",
                "per_class_accuracy.png"):
        assert (out / rel).exists(), rel
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["name"] == "ecl" and metrics["recipe"]["num_experts"] == 3
    assert 0.0 <= metrics["top1"] <= 1.0
    experts = metrics["ecl"]["experts"]
    assert [x["expert"] for x in experts] == [0, 1, 2] and metrics["ecl"]["inference_experts"] == [0, 1, 2]
    for x in experts:
        assert 0.0 <= x["top1"] <= 1.0
        assert set(x["subsets"]) == {"many", "medium", "few"}
        assert all(0.0 <= s["top1"] <= 1.0 for s in x["subsets"].values())

    steps = step_records(out)
    assert [r["global_step"] for r in steps] == list(range(1, 7))  # 2 epochs x 3 steps
    for r in steps:  # every switched-on term is logged, per expert too
        for key in ON_TERMS:
            assert np.isfinite(r[key]) and len(r[f"{key}_per_expert"]) == 3, key
        assert r["loss"] == pytest.approx(sum(r[k] for k in ON_TERMS), rel=1e-6)
    epochs = epoch_records(out)
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["samples"] == 3 * 32 for e in epochs)
    for epoch in epochs:
        assert set(epoch["ecl_omega"]) == {"many", "medium", "few"}
        # the EMA moved away from its start (chance level for both classifiers, i.e. every weight 1)
        assert any(abs(v - 1.0) > 1e-6 for v in epoch["ecl_omega"].values())
    assert not (out / "train" / "checkpoints").exists()  # removed once the stage is done

    # a second run skips both stages; a different inference subset re-runs only the evaluation
    model_mtime = (out / "train" / "model.pt").stat().st_mtime_ns
    run(cfg)
    assert (out / "train" / "model.pt").stat().st_mtime_ns == model_mtime
    run(smoke_cfg(fmnist_dir, out, "ecl.inference_experts=[1]"))
    assert (out / "train" / "model.pt").stat().st_mtime_ns == model_mtime
    single = json.loads((out / "metrics.json").read_text())
    assert single["ecl"]["inference_experts"] == [1]
    assert single["top1"] == pytest.approx(single["ecl"]["experts"][1]["top1"])
    assert single["ecl"]["experts"] == experts


@pytest.mark.parametrize("switches, absent, reweighted", [
    (["ecl.kd=false"], ["kd"], False),
    (["ecl.feature_kd=false"], ["feat"], True),
    (["ecl.reweight=false"], [], False),
    (["ecl.contrastive=false"], ["con"], True),
    (["ecl.kd=false", "ecl.feature_kd=false", "ecl.contrastive=false"], ["kd", "feat", "con"], False),
], ids=["no_kd", "no_feature_kd", "no_reweight", "no_contrastive", "bs_only"])
def test_switches_change_logged_parts(fmnist_dir, tmp_path, switches, absent, reweighted):
    out = tmp_path / "run"
    run(ecl_cfg(fmnist_dir, out, "stages=[train]", "train.max_steps_per_epoch=1", *switches))
    (step,) = step_records(out)
    for key in ("bs", "kd", "feat", "con"):
        assert (key in step) == (key not in absent), key
        assert (f"{key}_per_expert" in step) == (key not in absent), key
    # the logged loss is the sum of the logged terms
    assert step["loss"] == pytest.approx(sum(step[k] for k in ("bs", "kd", "feat", "con") if k in step), rel=1e-6)
    (epoch,) = epoch_records(out)
    assert ("ecl_omega" in epoch) == reweighted


def test_reweighting_changes_the_distillation_term(fmnist_dir, tmp_path):
    """Same data, same init: only the KD term differs between re-weighted and plain distillation, and
    only once the EMA has seen a batch (the first step's weights are all 1)."""
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        run(ecl_cfg(fmnist_dir, out, "stages=[train]", "train.max_steps_per_epoch=3", f"ecl.reweight={flag}"))
        runs[flag] = step_records(out)
    on, off = runs["true"], runs["false"]
    assert on[0]["kd"] == pytest.approx(off[0]["kd"], rel=1e-6)
    assert on[0]["bs"] == pytest.approx(off[0]["bs"], rel=1e-6)
    assert on[2]["kd"] != pytest.approx(off[2]["kd"], rel=1e-6)


def test_smoke_ecl_resumes_mid_epoch_exactly_including_the_ema(fmnist_dir, tmp_path):
    # The smoke config as shipped: 2 epochs x 3 steps, checkpoints every 2 steps and at epoch ends.
    # Killed after step 5, the run resumes from the step-4 checkpoint (epoch 1 after 1 batch) and
    # redoes step 5.
    cfg = load_config(SMOKE_ECL)
    assert (cfg.optim.epochs, cfg.train.max_steps_per_epoch, cfg.train.checkpoint_every_steps) == (2, 3, 2)
    extra = ("stages=[train]",)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(smoke_cfg(fmnist_dir, full, *extra))
    with pytest.raises(TrainingInterrupted):
        run(smoke_cfg(fmnist_dir, killed, *extra), on_step=InterruptAfter(5))
    info = find_latest(killed / "train" / "checkpoints")
    assert info.tag == "e0001-b000001"
    ema = load_checkpoint_state(info)["hooks"]["ema"]
    assert int(ema["seen"].max()) == 4  # the EMA state of step 4 travels in the checkpoint
    assert not torch.allclose(ema["acc_label"], ema["acc_kd"])
    run(smoke_cfg(fmnist_dir, killed, *extra))

    ref, res = step_records(full), step_records(killed)
    assert [r["global_step"] for r in res] == [r["global_step"] for r in ref] == list(range(1, 7))
    for a, b in zip(ref, res):
        for key in ("loss", *ON_TERMS):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["global_step"], key)
    ref_epochs, res_epochs = epoch_records(full), epoch_records(killed)
    assert [r["epoch"] for r in res_epochs] == [0, 1]
    for key in ("ecl_omega", "ecl_acc_label", "ecl_acc_kd"):
        for name, value in ref_epochs[1][key].items():
            assert res_epochs[1][key][name] == pytest.approx(value, abs=1e-6), (key, name)


def test_two_experts_with_shared_stages(fmnist_dir, tmp_path):
    out = tmp_path / "run"
    run(ecl_cfg(fmnist_dir, out, "ecl.num_experts=2", "ecl.shared_stages=2", "train.max_steps_per_epoch=1"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [x["expert"] for x in metrics["ecl"]["experts"]] == [0, 1]
    (step,) = step_records(out)
    assert len(step["bs_per_expert"]) == 2 and len(step["kd_per_expert"]) == 2
    state, meta = load_model_file(out / "train" / "model.pt")
    assert meta["num_experts"] == 2 and meta["shared_stages"] == 2
    keys = state.keys()
    assert any(k.startswith("shared.") for k in keys)
    assert not any(k.startswith("experts.2.") for k in keys)


def test_ensemble_is_the_mean_of_the_experts_label_logits():
    from lfme_fast.models import MultiExpert

    torch.manual_seed(0)
    model = MultiExpert("resnet_small28", 5, num_experts=3, shared_stages=1).eval()
    images = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        stacked = _stacked_label_logits(model, images).numpy()
        want_all = model.inference_logits(images).numpy()
        want_02 = model.inference_logits(images, experts=[0, 2]).numpy()
        single = model(images).label_logits[1].numpy()
    preds = Predictions(np.arange(4), np.zeros(4, dtype=np.int64), stacked.argmax(1), stacked)
    ens, experts = ensemble_predictions(preds, 3)
    np.testing.assert_allclose(ens.logits, want_all, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ens.preds, want_all.argmax(1))
    np.testing.assert_allclose(experts[1].logits, single, rtol=1e-5, atol=1e-6)
    ens02, _ = ensemble_predictions(preds, 3, [0, 2])
    np.testing.assert_allclose(ens02.logits, want_02, rtol=1e-5, atol=1e-6)


def test_classifier_terms_read_the_first_view_only():
    """With both views stacked, L_bs / L_kd / L_feat and the EMA see rows :B only; L_con sees all 2B."""
    from types import SimpleNamespace

    from lfme_fast.losses import ECLAccuracyEMA, ecl_loss
    from lfme_fast.models import MultiExpertOutput

    torch.manual_seed(0)
    m, b, c, d = 3, 6, 4, 8
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    first = [torch.randn(m, b, k) for k in (c, c, d)]
    garbage = [torch.randn(m, b, k) * 100 for k in (c, c, d)]  # what the second view's rows would add
    proj = torch.nn.functional.normalize(torch.randn(m, 2 * b, 5), dim=-1)
    out = MultiExpertOutput(*(torch.cat([f, g], dim=1) for f, g in zip(first, garbage)), proj=proj)
    counts = torch.tensor([50, 20, 5, 2])
    ema = ECLAccuracyEMA(c, m, 0.9)
    ema.update(torch.rand(m, b, c).softmax(-1), torch.rand(m, b, c).softmax(-1), labels)  # off its start
    acc_label, acc_kd = (a.clone() for a in ema.acc())
    expected = ECLAccuracyEMA(c, m, 0.9)
    expected.load_state_dict(ema.state_dict())
    expected.update(first[0].softmax(-1), first[1].softmax(-1), labels)  # T = 1, first view, no prior

    got = ECLLoss(ECLConfig(), counts, ema)(SimpleNamespace(labels=labels), out)
    want = ecl_loss(*first, labels, counts, proj=proj, proj_labels=labels.repeat(2), acc_label=acc_label,
                    acc_kd=acc_kd)
    for key in ("bs", "kd", "feat", "con"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6), key
    # the step's weights came from the EMA before this batch; the EMA then took the first view's rows
    torch.testing.assert_close(ema.acc_label, expected.acc_label)
    torch.testing.assert_close(ema.acc_kd, expected.acc_kd)


def test_contrastive_forward_needs_the_second_view():
    from types import SimpleNamespace

    loss = ECLLoss(ECLConfig(kd=False), torch.ones(3))
    with pytest.raises(ValueError, match="views_per_sample=2"):
        loss.forward(lambda *a, **k: None, SimpleNamespace(images=torch.zeros(2, 3, 8, 8), images2=None))


@pytest.mark.parametrize("override, key", [
    ("ecl.num_experts=1", "ecl.num_experts"),  # kd / feature_kd need peers
    ("ecl.num_experts=0", "ecl.num_experts"),
    ("ecl.lambda_kd=-1", "ecl.lambda_kd"),
    ("ecl.lambda_con=-0.5", "ecl.lambda_con"),
    ("ecl.temperature=0", "ecl.temperature"),
    ("ecl.con_temperature=-0.07", "ecl.con_temperature"),
    ("ecl.kappa=0.5", "ecl.kappa"),
    ("ecl.gamma=-1", "ecl.gamma"),
    ("ecl.ema_momentum=1.0", "ecl.ema_momentum"),
    ("ecl.shared_stages=4", "ecl.shared_stages"),  # resnet_small28 has 3 stages
    ("ecl.shared_stages=-1", "ecl.shared_stages"),
    ("ecl.inference_experts=[3]", "ecl.inference_experts"),
    ("ecl.inference_experts=[0, 0]", "ecl.inference_experts"),
    ("ecl.proj_dim=0", "ecl.proj_dim"),
    ("train.loss=ce", "train.loss"),
    ("model.classifier=cosine", "model.classifier"),
])
def test_bad_values_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*\(override '{re.escape(override)}'\)$"):
        load_config(ECL_YAML, [override])


def test_contrastive_needs_two_different_views():
    with pytest.raises(ConfigError, match=r"^ecl\.contrastive: .*data\.augment is none"):
        load_config(ECL_YAML, ["data.augment=none"])
    assert load_config(ECL_YAML, ["data.augment=none", "ecl.contrastive=false"]).data.augment == "none"


def test_one_expert_without_distillation_is_allowed():
    cfg = load_config(ECL_YAML, ["ecl.num_experts=1", "ecl.kd=false", "ecl.feature_kd=false"])
    assert cfg.ecl.num_experts == 1


def test_smoke_ecl_two_process_cpu_run(fmnist_dir, tmp_path, free_port):
    """``configs/smoke_ecl.yaml`` on 2 gloo processes through ``accelerate launch``: DDP over the
    multi-expert model (no unused parameter), the EMA statistics all-reduced in the loss, predictions
    gathered from both ranks."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "lfme_fast/train.py", "--config",
           "configs/smoke_ecl.yaml", *smoke_args(fmnist_dir), "--output-dir", str(out)]
    # ACCELERATE_USE_CPU + --multi_gpu gives two real gloo processes on CPU; one thread each.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["num_samples"] == 50  # every val image once
    assert len(metrics["ecl"]["experts"]) == 3
    epochs = epoch_records(out)
    assert [e["epoch"] for e in epochs] == [0, 1]
    for epoch in epochs:  # 3 steps of 32 per rank and epoch
        assert epoch["world_size"] == 2 and epoch["samples"] == 2 * 3 * 32
        assert set(epoch["ecl_omega"]) == {"many", "medium", "few"}
    assert [r["global_step"] for r in step_records(out)] == list(range(1, 7))
