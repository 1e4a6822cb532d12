"""Checkpoint + resume: a run killed mid-epoch and restarted produces the same per-step losses as an
uninterrupted run (CPU, to 1e-6), and the log keeps one record per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfme_fast.checkpoint import find_latest
from lfme_fast.config import load_config
from lfme_fast.logging_utils import read_jsonl
from lfme_fast.train import run
from lfme_fast.trainer import InterruptAfter, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]


def cfg_for(root: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "smoke.yaml", [
        f"data.root={root}", f"output_dir={out}", "data.test_split=val", "stages=[train]", "data.batch_size=32",
        "train.max_steps_per_epoch=5", "train.checkpoint_every_steps=3", "train.log_every=1", *extra])


def step_losses(out: Path) -> dict[int, float]:
    recs = [r for r in read_jsonl(out / "train" / "log.jsonl") if r["event"] == "step"]
    steps = [r["global_step"] for r in recs]
    assert len(steps) == len(set(steps)), f"duplicate step records: {steps}"
    return {r["global_step"]: r["loss"] for r in recs}


def kill_and_resume(root: Path, out: Path, kill_after: int, *extra: str) -> None:
    with pytest.raises(TrainingInterrupted):
        run(cfg_for(root, out, *extra), on_step=InterruptAfter(kill_after))
    assert not (out / "train" / "model.pt").exists()
    run(cfg_for(root, out, *extra))


@pytest.mark.parametrize("extra, kill_after, resume_tag", [
    # 5 steps/epoch, checkpoints at steps 3, 5 (epoch end), 6, 9: killed after step 7 -> resumes from
    # step 6 = epoch 1 after 1 batch, and redoes step 7
    (("data.augment=none",), 7, "e0001-b000001"),
    # accumulation 2: windows of 2 batches, 10 batches = 5 steps per epoch; the step-3 checkpoint sits
    # after batch 6 of epoch 0
    (("data.augment=none", "train.grad_accum=2", "train.max_steps_per_epoch=5"), 4, "e0000-b000006"),
], ids=["plain", "grad_accum"])
def test_resume_matches_uninterrupted(fmnist_dir, tmp_path, extra, kill_after, resume_tag):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(cfg_for(fmnist_dir, full, *extra))
    reference = step_losses(full)
    assert sorted(reference) == list(range(1, 11))

    with pytest.raises(TrainingInterrupted):
        run(cfg_for(fmnist_dir, killed, *extra), on_step=InterruptAfter(kill_after))
    assert find_latest(killed / "train" / "checkpoints").tag == resume_tag
    run(cfg_for(fmnist_dir, killed, *extra))
    resumed = step_losses(killed)
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), f"step {step}"
    log = read_jsonl(killed / "train" / "log.jsonl")
    resume = [r for r in log if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["from"] == resume_tag
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [0, 1]


def test_checkpoint_of_other_config_is_ignored(fmnist_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run(cfg_for(fmnist_dir, out, "data.augment=none"), on_step=InterruptAfter(4))
    run(cfg_for(fmnist_dir, out, "data.augment=none", "optim.lr=0.05"))  # another fingerprint: start over
    log = read_jsonl(out / "train" / "log.jsonl")
    assert not any(r["event"] == "resume" for r in log)
    assert json.loads((out / "train" / "done.json").read_text())["fingerprint"]


def test_resume_with_augmentation(fmnist_dir, tmp_path):
    """With random augmentation (pad-crop + flip on the 28 px images): the torch loader draws each
    sample's crop from (seed, epoch, index, occurrence), so a restarted process sees the same pixels."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(cfg_for(fmnist_dir, full))
    kill_and_resume(fmnist_dir, killed, 7)
    assert any(r["event"] == "resume" and r["from"] == "e0001-b000001" for r in read_jsonl(killed / "train" / "log.jsonl"))
    reference, resumed = step_losses(full), step_losses(killed)
    assert sorted(reference) == list(range(1, 11)) and sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), f"step {step}"
