"""A real 2-process CPU job (gloo) through ``accelerate launch``: both ranks train on disjoint shares,
predictions are gathered from both for the metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lfme_fast.logging_utils import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_two_process_cpu_smoke(fmnist_dir, tmp_path, free_port):
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "lfme_fast/train.py", "--config", "configs/smoke.yaml",
           f"data.root={fmnist_dir}", "data.test_split=val", "--output-dir", str(out)]
    # ACCELERATE_USE_CPU + --multi_gpu is what gives two real gloo processes on CPU (--cpu alone runs one);
    # one thread each, so two processes on a 2-core machine do not oversubscribe it.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["num_samples"] == 50  # every val image once, gathered from both ranks
    log = read_jsonl(out / "train" / "log.jsonl")
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [e["world_size"] for e in epochs] == [2, 2]
    assert all(e["samples"] == 2 * 4 * 64 for e in epochs)  # 4 steps of 64 per rank
    shards = epochs[0]["shards"]
    assert shards["per_rank_samples"] == [256, 256]
    assert shards["shared_between_ranks"] == 0 and shards["distinct"] == 512
    assert [r["global_step"] for r in log if r["event"] == "step"] == list(range(1, 9))
    assert (out / "per_class_accuracy.png").exists() and (out / "train" / "model.pt").exists()
