"""The student-step benchmark runs and reports every key (tiny sizes; the figures themselves come from
``python -m lfme_fast.bench step --json``)."""

from __future__ import annotations

import json

from lfme_fast.bench import step


def test_bench_step_tiny(tmp_path, capsys):
    out = tmp_path / "bench_step.json"
    step.main(["--json", "--json-out", str(out), "--device", "cpu", "--batch-size", "4", "--resolution", "32",
               "--repeats", "2", "--warmup", "1", "--store-samples", "64", "--views", "2"])
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    for key in ("plain_ce_s", "offline_kd_s", "live_kd_s", "plain_ce_min_s", "offline_kd_min_s", "live_kd_min_s",
                "ratio_offline_over_plain", "ratio_live_over_offline", "model", "batch_size", "resolution",
                "machine"):
        assert key in res, key
    assert res["model"] == "resnet10" and res["batch_size"] == 4 and res["resolution"] == 32
    assert all(len(v) == 2 and min(v) > 0 for v in res["all_times_s"].values())
    assert res["ratio_offline_over_plain"] == res["offline_kd_s"] / res["plain_ce_s"]
    assert res["store"]["bytes_per_image"] == 2 * 2 * 1000
    assert "cpu_count" in res["machine"]


def test_synthetic_store_reads_like_a_real_one(tmp_path):
    store = step.make_store(tmp_path / "s", 10, 2, (3, 5), load="mmap")
    t = store.teachers([0, 9], [1, 0])
    assert [tuple(x.shape) for x in t] == [(2, 3), (2, 5)]
    assert store.subset_classes[1].tolist() == [3, 4, 5, 6, 7]
