"""The comparison runner (``python -m lfme_fast.compare``) on the tiny Fashion-MNIST-LT fixture: rows over
seeds, mean ± std and paired differences that match the runs' own metrics, a re-run that trains nothing,
a removed result that is redone alone, and a protocol mismatch refused before anything trains.

Runs are one step of 16 images each (the point is the runner, not accuracy)."""

from __future__ import annotations

import json
import statistics

import pytest

from lfme_fast import compare
from lfme_fast.compare import ROWS, Row, check_protocol, row_config, summarise

# The fixture has no test split (val stands in) and ~930 training images (374..4 per class).
TINY = ["data.test_split=val", "eval.thresholds=[100, 20]", "optim.epochs=1", "train.max_steps_per_epoch=1",
        "data.batch_size=16", "log.progress=false"]


def _cli_args(data, out, rows: str, seeds: str = "0,1") -> list[str]:
    args = ["--data", str(data), "--rows", rows, "--seeds", seeds, "--out", str(out), "--name", "tiny"]
    for o in TINY:
        args += ["--set", o]
    return args


def _metrics(out, row: str, seed: int) -> dict:
    return json.loads((out / row / f"seed{seed}" / "metrics.json").read_text())


ECL_ABLATION = ("ecl", "ecl_no_kd", "ecl_no_reweight", "ecl_no_feature_kd", "ecl_no_contrastive", "balanced_softmax")


def test_registry_has_the_ecl_ablation_rows():
    for name in ECL_ABLATION:
        assert ROWS[name].path.exists(), name
    cfgs = {name: row_config(name, "DATA", 0, f"/tmp/{name}") for name in ECL_ABLATION}
    assert not cfgs["ecl_no_kd"].ecl.kd and not cfgs["ecl_no_kd"].ecl.reweight
    assert not cfgs["ecl_no_reweight"].ecl.reweight and cfgs["ecl_no_reweight"].ecl.kd
    assert not cfgs["ecl_no_feature_kd"].ecl.feature_kd and not cfgs["ecl_no_contrastive"].ecl.contrastive
    assert cfgs["balanced_softmax"].recipe == "baseline" and cfgs["balanced_softmax"].train.loss == "balanced_softmax"
    # the shipped configs already share one protocol: no override needed for these rows
    shared = check_protocol(cfgs)
    assert shared["data.augment"] == "auto" and shared["optim"]["epochs"] == 10
    assert [compare.views_per_sample(c) for c in cfgs.values()] == [2, 2, 2, 2, 1, 1]


def test_compare_end_to_end_resumes_and_pairs_seeds(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(_cli_args(fmnist_dir, out, "balanced_softmax,ecl_no_contrastive")) == 0
    report = json.loads((out / "tiny.json").read_text())
    page = (out / "tiny.md").read_text()
    assert report["rows"] == ["balanced_softmax", "ecl_no_contrastive"] and report["seeds"] == [0, 1]
    assert report["reference"] == "balanced_softmax" and report["skipped_finished"] == []

    # the table's numbers are the runs' own metrics, and the differences are paired by seed
    res = report["results"]
    for row in report["rows"]:
        for seed in (0, 1):
            m = _metrics(out, row, seed)
            assert res[row]["per_seed"][str(seed)]["overall"] == pytest.approx(100 * m["top1"])
            assert res[row]["per_seed"][str(seed)]["few"] == pytest.approx(100 * m["subsets"]["few"]["top1"])
        overall = [100 * _metrics(out, row, s)["top1"] for s in (0, 1)]
        assert res[row]["overall"]["mean"] == pytest.approx(statistics.fmean(overall))
        assert res[row]["overall"]["std"] == pytest.approx(statistics.stdev(overall))
    diffs = [100 * (_metrics(out, "ecl_no_contrastive", s)["top1"] - _metrics(out, "balanced_softmax", s)["top1"])
             for s in (0, 1)]
    got = res["ecl_no_contrastive"]["overall"]["diff"]
    assert list(got["per_seed"].values()) == pytest.approx(diffs)
    assert got["mean"] == pytest.approx(statistics.fmean(diffs))
    assert res["balanced_softmax"]["overall"]["diff"]["mean"] == 0.0

    # the protocol is written down, including who trains on two views, and the machine
    proto = report["protocol"]
    assert proto["epochs"] == 1 and proto["samples_per_epoch"] == 16 and proto["backbone"] == "resnet_small28"
    assert "pad-crop" in proto["augmentation"] and "one augmented view" in proto["views"]
    assert "-core CPU" in proto["machine_text"]
    assert report["row_facts"]["ecl_no_contrastive"]["models"] == 3
    assert "| Balanced Softmax (one model) (`balanced_softmax`) | 1 | 1 |" in page
    assert "Paired difference from `balanced_softmax`" in page and proto["machine_text"] in page
    assert set(report["run_seconds"]["ecl_no_contrastive"]) == {"0", "1"}

    # a second invocation trains nothing: every run is finished for the same config
    def refuse(cfg):
        raise AssertionError(f"{cfg.run_dir} was re-run")

    again = compare.compare(fmnist_dir, out, ["balanced_softmax", "ecl_no_contrastive"], [0, 1], TINY, name="tiny",
                            runner=refuse, log=lambda m: None)
    assert len(again["skipped_finished"]) == 4 and again["results"] == report["results"]

    # a run whose result is gone is redone, and only that one; a changed config re-runs its row
    (out / "ecl_no_contrastive" / "seed1" / "metrics.json").unlink()
    calls = []

    def counting(cfg):
        from lfme_fast.recipes import run

        calls.append(str(cfg.run_dir))
        return run(cfg)

    compare.compare(fmnist_dir, out, ["balanced_softmax", "ecl_no_contrastive"], [0, 1], TINY, name="tiny",
                    runner=counting, log=lambda m: None)
    assert calls == [str(out / "ecl_no_contrastive" / "seed1")]
    assert (out / "ecl_no_contrastive" / "seed1" / "metrics.json").exists()
    marker = json.loads((out / "ecl_no_contrastive" / "seed1" / "compare.json").read_text())
    assert marker["resumed"] is False and marker["seconds"] > 0

    # an interrupted run (a checkpoint left, no result) is recorded as resumed, and the page says so
    run_dir = out / "balanced_softmax" / "seed0"
    metrics = (run_dir / "metrics.json").read_text()
    (run_dir / "metrics.json").unlink()
    (run_dir / "train" / "checkpoints").mkdir()
    (run_dir / "train" / "checkpoints" / "latest.json").write_text("{}")

    def finish_interrupted(cfg):  # stands in for the recipe resuming from the checkpoint
        (run_dir / "train" / "checkpoints" / "latest.json").unlink()
        (run_dir / "metrics.json").write_text(metrics)

    report = compare.compare(fmnist_dir, out, ["balanced_softmax", "ecl_no_contrastive"], [0, 1], TINY, name="tiny",
                             runner=finish_interrupted, log=lambda m: None, notes=["Shared with another job."])
    assert report["resumed_runs"] == ["balanced_softmax/seed0"] and report["notes"] == ["Shared with another job."]
    page = (out / "tiny.md").read_text()
    assert "time covers the last invocation only: balanced_softmax/seed0." in page
    assert "- Shared with another job." in page
    capsys.readouterr()


def test_two_view_rows_are_named_in_the_protocol(fmnist_dir, tmp_path):
    out = tmp_path / "cmp"
    report = compare.compare(fmnist_dir, out, ["ecl", "balanced_softmax"], [0], TINY, name="two",
                             reference="balanced_softmax", log=lambda m: None)
    assert "ecl train on two independently augmented views" in report["protocol"]["views"]
    assert report["row_facts"]["ecl"]["views_per_sample"] == 2
    assert report["results"]["ecl"]["overall"]["std"] is None  # one seed: no spread claimed
    assert "| ECL (full) (`ecl`) | 3 | 2 |" in (out / "two.md").read_text()


def test_protocol_mismatch_is_refused_before_training(tmp_path):
    compare.register_row("_test_more_epochs", Row("fmnist_lt/ecl.yaml", ("optim.epochs=3",)))
    try:
        def refuse(cfg):
            raise AssertionError("trained despite the protocol mismatch")

        with pytest.raises(ValueError, match=r"optim differs .*ecl: .*_test_more_epochs: .*--set optim"):
            compare.run_rows("DATA", tmp_path, ["ecl", "_test_more_epochs"], [0], runner=refuse)
        # one --set for every row makes them agree again
        plan = {r: row_config(r, "DATA", 0, tmp_path / r, ["optim.epochs=3"]) for r in ("ecl", "_test_more_epochs")}
        assert check_protocol(plan)["optim"]["epochs"] == 3
    finally:
        ROWS.pop("_test_more_epochs")


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--data", "D", "--rows", "ecl,nope", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "unknown row 'nope'; known rows: ce_instance, " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--data", "D", "--out", str(tmp_path)])
    assert "give --rows (or a --preset / --quick)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--preset", "nope"])
    assert "unknown --preset 'nope'; known: fmnist_lt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--reference 'ecl_no_kd' must be one of the rows"):
        compare.compare("D", tmp_path, ["ecl"], [0], reference="ecl_no_kd")
    with pytest.raises(ValueError, match="already registered"):
        compare.register_row("ecl", ROWS["ecl"])


def test_summarise_pairs_only_common_seeds():
    def row(x):
        return {"many": x, "medium": x, "few": None, "overall": x}

    results = {"ref": {0: row(0.50), 1: row(0.60), 2: row(0.70)}, "b": {0: row(0.55), 2: row(0.90)}}
    s = summarise(results, [0, 1, 2], "ref")
    assert s["b"]["overall"]["diff"]["per_seed"] == pytest.approx({"0": 5.0, "2": 20.0})
    assert s["b"]["overall"]["diff"]["mean"] == pytest.approx(12.5)
    assert s["b"]["overall"]["mean"] == pytest.approx(72.5) and s["b"]["overall"]["n"] == 2
    assert s["ref"]["few"]["mean"] is None and s["ref"]["few"]["diff"]["n"] == 0


# ---- issue 12: the full row set, shared folders, presets, convergence -------------------------------

def test_full_row_set_resolves_under_the_fmnist_preset():
    preset = compare.PRESETS["fmnist_lt"]
    assert len(preset.seeds) >= 3
    cfgs = {r: row_config(r, "DATA", 0, f"/tmp/{r}", preset.overrides) for r in preset.rows}
    shared = check_protocol(cfgs)  # one protocol for every row, before anything trains
    assert shared["optim"]["epochs"] == 6 and shared["data.backend"] == "ffcv"
    # the offline rows replay every pad-crop view, computing only the rows their student draws
    for r in ("lfme", "lfme_kd", "lfme_kd_spes"):
        assert cfgs[r].lfme.views == "all" and cfgs[r].lfme.fill == "drawn"
    for r in ("cbd", "cbd_ens"):
        assert cfgs[r].cbd.views == "all" and cfgs[r].cbd.fill == "drawn"
    # recipe-section overrides reach only the rows that have the section
    assert "experts" not in cfgs["ce_balanced"].sections and cfgs["lfme"].experts.epochs == 8
    assert (cfgs["lfme_kd"].lfme.spes, cfgs["lfme_kd"].lfme.spis) == ("off", "off")
    assert (cfgs["lfme_kd_spes"].lfme.spes, cfgs["lfme_kd_spes"].lfme.spis) == ("matched", "off")
    order = compare.PRESETS["fmnist_lt_order"]
    assert set(order.rows) == {"ce_balanced", "lfme", "cbd_ens", "ecl"}


def test_override_for_no_row_and_share_order_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"override 'lfmee.views=2' applies to none of the rows"):
        compare.run_rows("DATA", tmp_path, ["ce_balanced"], [0], ["lfmee.views=2"], runner=lambda cfg: None)
    with pytest.raises(ValueError, match=r"row 'lfme_kd' shares experts, offline with row 'lfme': list 'lfme' before"):
        compare.run_rows("DATA", tmp_path, ["lfme_kd", "lfme"], [0], runner=lambda cfg: None)


@pytest.mark.parametrize("values, moved, moving", [
    ([0.5, 0.7, 0.8, 0.6, 0.85, 0.85], 0.0, False),    # last fifth of 6 = 1 epoch, from epoch 5: flat
    ([0.5, 0.7, 0.8, 0.8, 0.84, 0.85], 1.0, True),
    ([0.5, 0.7, 0.8, 0.8, 0.845, 0.85], 0.5, False),   # exactly 0.5 points (1 of 200 images) is not moving
    ([0.5, 0.6, 0.7, 0.8, 0.8, 0.84, 0.85, 0.85], 1.0, True),  # 8 epochs: the last 2, from epoch 6
    ([0.3, 0.9], 60.0, True),
])
def test_movement_over_the_last_fifth(values, moved, moving):
    m = compare.movement(values)
    assert m["moved"] == pytest.approx(moved) and m["moving"] is moving and m["epochs"] == len(values)
    assert compare.movement([0.4])["moving"] is None


def test_quick_preset_runs_every_row_and_reports(fmnist_dir, tmp_path):
    """``--quick`` on the fixture: every row of the full comparison trains, the LFME rows share one
    expert run and store, the page flags moving runs and the two PNGs are written."""
    out = tmp_path / "quick"
    args = ["--quick", "--data", str(fmnist_dir), "--out", str(out), "--name", "q",
            "--set", "data.test_split=val", "--set", "eval.thresholds=[100, 20]", "--set", "experts.thresholds=[100, 20]",
            "--set", "data.batch_size=32", "--set", "experts.batch_size=[16, 8, 4]"]
    assert compare.main(args) == 0
    report = json.loads((out / "q.json").read_text())
    assert report["rows"] == list(compare.FULL_ROWS)
    for name in ("q.png", "q_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # shared: the LFME ablation rows link the lfme row's experts and store
    link = out / "lfme_kd" / "seed0" / "offline"
    assert link.is_symlink() and link.resolve() == (out / "lfme" / "seed0" / "offline").resolve()
    assert json.loads((out / "lfme" / "seed0" / "offline" / "header.json").read_text())["views"]["fill"] == "drawn"
    # every run's evaluated model logged a val curve, and the experts and teachers theirs
    conv = report["convergence"]
    for row in compare.FULL_ROWS:
        stages = conv[row]["0"]
        assert any(s["main"] for s in stages.values()), row
    assert {"experts/many", "experts/few"} <= set(conv["lfme"]["0"])
    assert {"teachers/t0", "teachers/t3"} <= set(conv["cbd_ens"]["0"])
    page = (out / "q.md").read_text()
    assert "**Convergence.**" in page and "![validation curves](q_curves.png)" in page
    # a report-only pass trains nothing and gives the same table
    before = (out / "lfme" / "seed0" / "metrics.json").stat().st_mtime_ns
    assert compare.main([*args, "--report-only"]) == 0
    assert (out / "lfme" / "seed0" / "metrics.json").stat().st_mtime_ns == before
    assert json.loads((out / "q.json").read_text())["results"] == report["results"]
    # --also appends another report (here: the same one) as a section of the page and of the JSON
    args2 = [a if a != "q" else "q2" for a in args]
    assert compare.main([*args2, "--report-only", "--also", str(out / "q.json")]) == 0
    page2 = (out / "q2.md").read_text()
    assert page2.count("**Convergence.**") == 2 and "\n## " + report["title"] in page2
    assert json.loads((out / "q2.json").read_text())["also"][0]["results"] == report["results"]
