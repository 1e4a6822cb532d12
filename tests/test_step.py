"""The student-step benchmark runs and reports every key (tiny sizes; the figures themselves come from
``python -m lfme_fast.bench step --json``)."""

from __future__ import annotations

import json
import statistics

import pytest

from lfme_fast.bench import step


def test_bench_step_tiny(tmp_path, capsys, synthetic_dir):
    out = tmp_path / "bench_step.json"
    step.main(["--json", "--json-out", str(out), "--device", "cpu", "--batch-size", "4", "--resolution", "32",
               "--repeats", "2", "--warmup", "1", "--store-samples", "64", "--views", "2",
               "--loader-data", str(synthetic_dir), "--loader-rounds", "1"])
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

    # the ECL rows: whole steps (two views and one), their split, the second view's loading
    for key in ("ecl_s", "ecl_min_s", "ecl_one_view_s", "ratio_ecl_over_plain", "plain_forward_s", "ecl_forward_s",
                "ecl_losses_s", "ecl_backward_opt_s", "ecl_losses_only_s", "plain_backward_opt_s",
                "ecl_second_view_compute_s",
                "loader_one_view_batch_s", "loader_two_views_batch_s", "loader_second_view_s",
                "ecl_step_with_loading_s", "plain_step_with_loading_s", "ratio_ecl_over_plain_with_loading"):
        assert isinstance(res[key], float), key
    assert res["ecl_experts"] == 3 and res["ecl_views"] == 2
    assert set(res["all_times_s"]) == {"plain_ce", "offline_kd", "live_kd", "ecl", "ecl_one_view", "plain_forward",
                                       "cbd_offline", "cbd_live"}
    assert res["ratio_ecl_over_plain"] == res["ecl_s"] / res["plain_ce_s"]
    assert res["plain_forward_s"] == pytest.approx(statistics.median(res["all_times_s"]["plain_forward"]))
    assert res["ecl_step_with_loading_s"] == pytest.approx(res["ecl_s"] + res["loader_two_views_batch_s"])
    assert min(res["ecl_forward_s"], res["ecl_losses_s"], res["ecl_backward_opt_s"], res["loader_one_view_batch_s"]) > 0
    # 41 training images in batches of 4 (drop_last): 10 batches an epoch, one timed epoch per loader
    assert res["loader_batches_per_epoch"] == 10 and len(res["loader_per_batch_s"]["2"]) == 1

    # the CBD rows: stored teacher features vs live teachers (4 x ResNet-10 features of 512, float16, 2 views)
    for key in ("cbd_offline_s", "cbd_offline_min_s", "cbd_live_s", "cbd_live_min_s"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["cbd_teachers"] == 4 and res["cbd_teacher_width"] == 512
    assert res["cbd_store_bytes_per_image"] == 4 * 512 * 2 * 2
    assert res["ratio_cbd_offline_over_plain"] == res["cbd_offline_s"] / res["plain_ce_s"]


def test_bench_step_without_ecl_keeps_the_original_keys(tmp_path, capsys):
    out = tmp_path / "bench_step.json"
    step.main(["--json-out", str(out), "--device", "cpu", "--batch-size", "2", "--resolution", "32", "--repeats", "1",
               "--warmup", "0", "--store-samples", "16", "--no-ecl", "--no-cbd"])
    res = json.loads(out.read_text())
    assert set(res["all_times_s"]) == {"plain_ce", "offline_kd", "live_kd"}
    assert "ecl_s" not in res and "loader_second_view_s" not in res and res["offline_kd_s"] > 0
    capsys.readouterr()


def test_ecl_step_loss_is_the_recipes():
    """The benchmark's ECL step runs the recipe's loss: every term on, both views in one forward."""
    from types import SimpleNamespace

    import torch

    from lfme_fast.bench.ecl_step import ECLStep, lt_counts

    x, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    s = ECLStep("resnet10", 6, 3, x, x2, torch.tensor([0, 1, 2, 5]), torch.device("cpu"), torch.contiguous_format,
                lambda: torch.autocast("cpu", enabled=False))
    out = s.loss.forward(s.model, s.batch)
    assert out.label_logits.shape == (3, 8, 6) and out.proj.shape[:2] == (3, 8)
    parts = s.loss(s.batch, out)
    assert {"bs", "kd", "feat", "con"} <= set(parts.parts)
    assert "con" not in s.loss_one_view(s.batch, s.loss_one_view.forward(s.model, s.batch)).parts
    before = [p.detach().clone() for p in s.model.parameters()]
    s.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, s.model.parameters()))
    # the step's parts are timed inside it, per kind of step
    s.step(two_views=False)
    assert len(s.records[True]) == 1 and len(s.records[False]) == 1
    split = s.split(1)
    assert split["ecl_forward_s"] == s.records[True][0][0] and split["ecl_backward_opt_s"] == s.records[True][0][2]
    with pytest.raises(ValueError, match="no recorded ECL step"):
        ECLStep.split(SimpleNamespace(records={True: []}), 1)
    counts = lt_counts(6)
    assert counts[0] == 1280 and counts[-1] == 5 and bool((counts[1:] <= counts[:-1]).all())


def test_synthetic_store_reads_like_a_real_one(tmp_path):
    store = step.make_store(tmp_path / "s", 10, 2, (3, 5), load="mmap")
    t = store.teachers([0, 9], [1, 0])
    assert [tuple(x.shape) for x in t] == [(2, 3), (2, 5)]
    assert store.subset_classes[1].tolist() == [3, 4, 5, 6, 7]
