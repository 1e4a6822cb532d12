"""Scaling out (issue 14) with real launches on CPU (gloo): a run checkpointed mid-epoch on one process
resumes on two from the same global position, a per-process-batch checkpoint refuses another process
count with a way forward, and two "machines" on localhost run LFME end to end like one machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfme_fast.checkpoint import find_latest
from lfme_fast.config import load_config
from lfme_fast.logging_utils import read_jsonl
from lfme_fast.train import run
from lfme_fast.trainer import InterruptAfter, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
#: ACCELERATE_USE_CPU + --multi_gpu gives real gloo processes on CPU; one thread each (2-core CI machines)
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
#: see tests/test_distributed.py: the same global batches, BatchNorm statistics per process
LOSS_TOLERANCE = 0.05


def _launch(args: list[str], *, processes: int, port: int, machines: int = 1, machine_rank: int = 0) -> list[str]:
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", str(machines),
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", "lfme_fast/train.py", *args]


def _step_losses(stage_dir: Path) -> dict[int, float]:
    return {r["global_step"]: r["loss"] for r in read_jsonl(stage_dir / "log.jsonl") if r["event"] == "step"}


SMOKE = ("data.batch_size=null", "data.global_batch_size=64", "data.test_split=val", "stages=[train]",
         "train.max_steps_per_epoch=4", "train.checkpoint_every_steps=2", "train.log_every=1")


def test_mid_epoch_checkpoint_of_one_process_resumes_on_two(fmnist_dir, tmp_path, free_port):
    """Killed after step 3 on one process (checkpoint after step 2, mid-epoch 0), resumed on two: the
    resume continues at global position 2 x 64 and every later step matches the uninterrupted
    1-process run within the BatchNorm tolerance."""
    over = [*SMOKE, f"data.root={fmnist_dir}"]
    full, moved = tmp_path / "full", tmp_path / "moved"
    run(load_config(REPO / "configs" / "smoke.yaml", [*over, f"output_dir={full}"]))
    with pytest.raises(TrainingInterrupted):
        run(load_config(REPO / "configs" / "smoke.yaml", [*over, f"output_dir={moved}"]), on_step=InterruptAfter(3))
    info = find_latest(moved / "train" / "checkpoints")
    assert (info.tag, info.world_size, info.batch["global_batch"]) == ("e0000-b000002", 1, 64)

    res = subprocess.run(_launch(["--config", "configs/smoke.yaml", *over, "--output-dir", str(moved)], processes=2,
                                 port=free_port), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "continuing at global position 128 (2 micro-batches per process)" in res.stdout
    log = read_jsonl(moved / "train" / "log.jsonl")
    resume = [r for r in log if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["from_world_size"] == 1 and resume[0]["world_size"] == 2
    assert resume[0]["per_process_batch"] == 32 and resume[0]["global_batch"] == 64
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [e["world_size"] for e in epochs] == [2, 2] and epochs[0]["resumed_at_batch"] == 2
    assert epochs[1]["samples"] == 4 * 64  # epoch 1 entirely on two processes: 4 steps of the global 64
    reference, resumed = _step_losses(full / "train"), _step_losses(moved / "train")
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    for step in range(1, 3):  # done before the interruption, on one process: exact
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6)
    for step in range(3, 9):
        assert abs(resumed[step] - reference[step]) < LOSS_TOLERANCE, (step, resumed[step], reference[step])


def test_per_process_checkpoint_refuses_another_world_size(fmnist_dir, tmp_path):
    """A checkpoint written under per-process batches by another process count (simulated: its metadata
    says 2 processes) is neither resumed nor silently discarded: the run stops and says what to do."""
    over = ["data.test_split=val", "stages=[train]", "train.max_steps_per_epoch=4", "train.checkpoint_every_steps=2",
            f"data.root={fmnist_dir}", f"output_dir={tmp_path / 'run'}"]
    cfg = load_config(REPO / "configs" / "smoke.yaml", over)
    with pytest.raises(TrainingInterrupted):
        run(cfg, on_step=InterruptAfter(3))
    ckpt = tmp_path / "run" / "train" / "checkpoints"
    meta = json.loads((ckpt / "latest.json").read_text())
    assert meta["batch"]["batch_semantics"] == "per_process"
    meta.update(world_size=2, fingerprint="written-with-2-processes",
                batch={**meta["batch"], "world_size": 2, "global_batch": 128})
    (ckpt / "latest.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=r"written by 2 process\(es\) with per-process batches \(global batch 128\);"
                                           r" this launch has 1 process\(es\).*Relaunch with 2 processes.*delete .*"
                                           r"checkpoints.*data\.global_batch_size"):
        run(cfg)


LFME = ("data.batch_size=null", "data.global_batch_size=32", "data.test_split=val", "experts.thresholds=[100, 20]",
        "eval.thresholds=[100, 20]", "experts.epochs=1", "experts.batch_size=null",
        "experts.global_batch_size=[16, 8, 4]", "optim.epochs=1", "train.max_steps_per_epoch=3", "lfme.views=2",
        "log.progress=false", "experts.eval_test=false", "train.log_every=1")


def test_two_machines_on_localhost_match_one_machine(fmnist_dir, tmp_path, free_port):
    """``accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`` (one process
    per "machine", gloo, a shared run folder): experts, the offline store written by both ranks, the
    student and the eval, compared with the same config on one process."""
    over = [*LFME, f"data.root={fmnist_dir}"]
    two = tmp_path / "two_machines"
    cmds = [_launch(["--config", "configs/fmnist_lt/lfme.yaml", *over, "--output-dir", str(two)], processes=2,
                    machines=2, machine_rank=rank, port=free_port) for rank in (0, 1)]
    procs = [subprocess.Popen(c, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "world size 2, per-process batch 16, grad_accum 1, global batch 32" in outs[0]

    one = tmp_path / "one_machine"
    run(load_config(REPO / "configs" / "fmnist_lt" / "lfme.yaml", [*over, f"output_dir={one}"]))
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert (m2["world_size"], m1["world_size"]) == (2, 1)
    assert m2["num_samples"] == m1["num_samples"] == 50  # every val image once, gathered across machines
    # the offline store, written by both machines' ranks: every row filled, the same stored views, and
    # logits close to the 1-machine store's (the experts differ only by BatchNorm statistics; measured
    # max |difference| 0.23 on logits of mean magnitude 0.45 after one short epoch)
    import numpy as np
    from lfme_fast.augment import FixedViews

    for name in ("expert0.logits.npy", "expert1.logits.npy", "expert2.logits.npy", "confidence.npy"):
        a, b = (np.load(d / "offline" / name).astype(np.float64) for d in (two, one))
        assert a.shape == b.shape and np.isfinite(a).all(), name
        assert (np.abs(a).reshape(a.shape[0], -1).sum(axis=1) > 0).all(), f"{name}: rows left unwritten"
        assert np.abs(a - b).max() < 1.0, name
    va, vb = (FixedViews.load(d / "offline" / "views.npz") for d in (two, one))
    assert np.array_equal(va.boxes, vb.boxes) and np.array_equal(va.flips, vb.flips)
    # the same global batches on one or two machines: the loss curves agree up to BatchNorm statistics
    for stage in ("experts/many", "experts/medium", "experts/few", "student"):
        l2, l1 = _step_losses(two / stage), _step_losses(one / stage)
        assert sorted(l2) == sorted(l1) and l1, stage
        worst = max(abs(l2[s] - l1[s]) for s in l1)
        assert worst < LOSS_TOLERANCE, (stage, worst)
    start = next(r for r in read_jsonl(two / "experts" / "few" / "log.jsonl") if r["event"] == "start")
    assert (start["per_process_batch"], start["global_batch"], start["batch_key"]) == (
        2, 4, "experts.global_batch_size[2]")
    # metrics: 50 val images, so one image is 2 points of top-1; a few images may flip with BatchNorm
    assert abs(m2["top1"] - m1["top1"]) <= 0.1, (m2["top1"], m1["top1"])

    # a global-batch run folder carries over to another process count: one process on the two-machine
    # run's folder finds every stage up to date (the world size is not part of their fingerprints)
    before = {f: f.read_bytes() for f in two.rglob("*") if f.is_file() and f.name != "train.log"}
    run(load_config(REPO / "configs" / "fmnist_lt" / "lfme.yaml", [*over, f"output_dir={two}"]))
    after = {f: f.read_bytes() for f in two.rglob("*") if f.is_file() and f.name != "train.log"}
    assert sorted(after) == sorted(before)
    assert [str(f.relative_to(two)) for f in before if after[f] != before[f]] == []  # nothing retrained
