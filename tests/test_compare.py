"""The comparison runner (``python -m lfme_fast.compare``) on the tiny Fashion-MNIST-LT fixture: rows over
seeds, mean ± std and paired differences that match the runs' own metrics, a re-run that trains nothing,
a removed result that is redone alone, and a protocol mismatch refused before anything trains.

Runs are one step of 16 images each (the point is the runner, not accuracy)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

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
    assert "![validation curves](q_curves.png)" in page
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


# ---- review fixes: overrides, preset data, markers, stage curves, report text ---------------------

def _quiet(message):
    pass


def _refuse(cfg):
    raise AssertionError(f"{cfg.run_dir} was run")


def test_set_may_not_replace_a_value_a_row_sets_itself(tmp_path):
    # lfme_kd turns SpIS off itself: a comparison-wide SpIS would make it another method under its label
    with pytest.raises(ValueError, match=r"'lfme\.spis=official' would change what row 'lfme' is"):
        compare.run_rows("DATA", tmp_path, ["lfme", "lfme_kd"], [0], ["lfme.spis=official"], runner=_refuse)
    with pytest.raises(ValueError, match=r"row 'ecl_no_kd'.*ecl\.kd is False"):
        compare.check_overrides(["ecl", "ecl_no_kd"], ["ecl.kd=true"])
    # the value the row sets anyway, and keys no row sets itself, are fine
    compare.check_overrides(["lfme_kd", "lfme_kd_spes"], ["lfme.spis=off", "lfme.views=all", "optim.epochs=2"])
    compare.check_overrides(["cbd_ce", "cbd"], ["cbd.epochs=1"])
    # a key that tells registered rows apart may not redefine a row even where the row's own file sets
    # it: LFME full keeps SpIS, CE class-balanced keeps its sampler, ECL keeps its distillation
    with pytest.raises(ValueError, match=r"'lfme\.spis=off' would change what row 'lfme' is.*lfme_kd: False"):
        compare.check_overrides(["lfme"], ["lfme.spis=off"])
    with pytest.raises(ValueError, match=r"row 'ce_balanced'.*train\.sampler is 'class_balanced'"):
        compare.check_overrides(["ce_balanced"], ["train.sampler=instance"])
    with pytest.raises(ValueError, match=r"row 'ecl'.*ecl\.kd is True"):
        compare.check_overrides(["ecl"], ["ecl.kd=false"])
    # every preset's own protocol passes for its rows
    for preset in compare.PRESETS.values():
        compare.check_overrides(list(preset.rows), list(preset.overrides))
    # a key inside one the override sets whole (model.kwargs) counts as the same key
    compare.register_row("_test_stem", Row("fmnist_lt/ce_balanced.yaml", ("model.kwargs.stem_width=4",)))
    try:
        with pytest.raises(ValueError, match=r"row '_test_stem'.*model\.kwargs\.stem_width"):
            compare.check_overrides(["_test_stem"], ["model.kwargs={stem_width: 8}"])
    finally:
        ROWS.pop("_test_stem")


def _manifest(folder: Path, **source) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"splits": {"train": {"num_samples": 930}},
                                                      "source": {"seed": 0, **source}}))
    return folder


def test_preset_data_defaults_and_the_permuted_order_is_checked(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compare, "compare", lambda data, out, rows, seeds, overrides, **kw: calls.append(str(data)))
    monkeypatch.chdir(tmp_path)
    assert compare.PRESETS["fmnist_lt_order"].data == "data/fmnist_lt_ir100_order1"
    assert compare.PRESETS["fmnist_lt"].data == compare.PRESETS["quick"].data == "data/fmnist_lt_ir100"
    # without --data: the preset's own folder (here with the permutation recorded)
    _manifest(tmp_path / "data" / "fmnist_lt_ir100_order1", class_order=1, class_permutation=list(range(10)))
    assert compare.main(["--preset", "fmnist_lt_order"]) == 0
    assert calls == ["data/fmnist_lt_ir100_order1"]
    assert compare.main(["--preset", "fmnist_lt"]) == 0 and calls[-1] == "data/fmnist_lt_ir100"
    # the label-order data (or none at all) is refused for the permuted-order preset, naming the fix
    plain = _manifest(tmp_path / "plain")
    assert compare.main(["--preset", "fmnist_lt_order", "--data", str(plain)]) == 2
    err = capsys.readouterr().err
    assert str(plain) in err and "source.class_order" in err and "data_prep fmnist-lt" in err
    assert "--class-order 1" in err
    assert compare.main(["--preset", "fmnist_lt_order", "--data", str(tmp_path / "missing")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err and len(calls) == 2


def _metrics_json(top1: float) -> str:
    return json.dumps({"top1": top1, "convention": "test", "subsets": {k: {"top1": top1} for k in ("many", "medium", "few")}})


def test_a_rerun_that_trains_nothing_keeps_the_training_time_and_no_marker_outlives_a_run(tmp_path):
    run_dir = tmp_path / "ce_balanced" / "seed0"
    marker_path = run_dir / "compare.json"
    seen = []

    def recipe(top1, trains=True):
        """A stand-in recipe: training rewrites the stage's done.json; evaluating writes metrics.json."""
        def runner(cfg):
            seen.append(marker_path.exists())  # the old marker must be gone while the recipe runs
            run_dir.mkdir(parents=True, exist_ok=True)
            if trains:
                (run_dir / "train").mkdir(exist_ok=True)
                (run_dir / "train" / "done.json").write_text(json.dumps({"trained": len(seen)}))
            if top1 is not None:
                (run_dir / "metrics.json").write_text(_metrics_json(top1))
        return runner

    def rows(overrides, runner, **kw):
        return compare.run_rows("DATA", tmp_path, ["ce_balanced"], [0], overrides, runner=runner, log=_quiet, **kw)

    def recorded():
        return json.loads(marker_path.read_text())["seconds"]

    rows(["log.progress=false"], recipe(0.5))
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "seconds": 1000.0}))  # as if training took 1000 s
    # a cosmetic change: the recipe finds every stage up to date and writes nothing
    raw = rows(["log.progress=true"], recipe(None, trains=False))
    assert seen == [False, False]
    assert 1000.0 <= raw["seconds"]["ce_balanced"][0] < 1060 and recorded() == raw["seconds"]["ce_balanced"][0]
    assert json.loads(marker_path.read_text())["config_sha"] != marker["config_sha"]
    # only the evaluation runs again (it rewrites metrics.json, here with the same content): still no training
    raw = rows(["log.progress=false"], recipe(0.5, trains=False))
    assert 1000.0 <= raw["seconds"]["ce_balanced"][0] < 1120
    # a run that trains records its own time, not the earlier one's
    raw = rows(["log.progress=true"], recipe(0.6))
    assert raw["seconds"]["ce_balanced"][0] < 60 and recorded() < 60
    # an interrupted re-run under another config leaves no marker claiming the folder
    def interrupted(cfg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rows(["log.progress=false"], interrupted)
    assert not marker_path.exists() and (run_dir / "metrics.json").exists()
    with pytest.raises(ValueError, match="has not finished"):
        rows(["log.progress=false"], _refuse, report_only=True)


def _log(folder: Path, values, before=()) -> None:
    """A stage's log.jsonl: an earlier training (``before``), then a restart with ``values``."""
    folder.mkdir(parents=True, exist_ok=True)
    recs = [{"event": "start"}, *({"event": "epoch", "val_top1": v} for v in before)] if before else []
    recs += [{"event": "start"}, *({"event": "epoch", "epoch": e, "val_top1": v} for e, v in enumerate(values))]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_val_curves_read_only_the_stages_the_config_names(tmp_path):
    cfg = row_config("cbd", "DATA", 0, tmp_path / "cbd", ["optim.epochs=3"])
    assert len(cfg.cbd.teachers) == 1
    run_dir = Path(cfg.run_dir)
    _log(run_dir / "teachers" / "t0", [0.5, 0.6, 0.62], before=[0.1, 0.2])
    _log(run_dir / "teachers" / "t3", [0.1, 0.5, 0.9])  # left by an earlier 4-teacher config
    _log(run_dir / "student", [0.4, 0.5, 0.5])
    assert compare.run_stages(cfg) == ["teachers/t0", "student"]
    assert set(compare.val_curves(run_dir)) == {"teachers/t0", "teachers/t3", "student"}  # every folder
    curves = compare.val_curves(run_dir, compare.run_stages(cfg))
    assert curves == {"student": [0.4, 0.5, 0.5], "teachers/t0": [0.5, 0.6, 0.62]}
    conv = compare.convergence({"cbd": {0: cfg}})["cbd"]["0"]
    assert set(conv) == {"teachers/t0", "student"} and conv["student"]["main"] and not conv["teachers/t0"]["main"]

    # LFME: one expert per subset of experts.thresholds (two thresholds: many, medium, few)
    lfme = row_config("lfme", "DATA", 0, tmp_path / "lfme")
    for name in ("many", "medium", "few", "subset3"):
        _log(Path(lfme.run_dir) / "experts" / name, [0.5, 0.6])
    _log(Path(lfme.run_dir) / "student", [0.5, 0.6])
    assert compare.run_stages(lfme) == ["experts/many", "experts/medium", "experts/few", "student"]
    assert set(compare.convergence({"lfme": {0: lfme}})["lfme"]["0"]) == set(compare.run_stages(lfme))
    two = row_config("lfme", "DATA", 0, tmp_path / "lfme", ["experts.thresholds=[1000]", "experts.batch_size=64"])
    assert compare.run_stages(two) == ["experts/many", "experts/few", "student"]
    assert compare.run_stages(row_config("ecl", "DATA", 0, tmp_path / "ecl")) == ["train"]


def _protocol_inputs(tmp_path, overrides):
    data = _manifest(tmp_path / "data")
    cfgs = {r: row_config(r, data, 0, tmp_path / r / "seed0", overrides) for r in ("ce_balanced", "ce_instance")}
    facts = {r: compare.row_facts(c) for r, c in cfgs.items()}
    return cfgs, facts, compare.describe_protocol(check_protocol(cfgs), facts)


def test_a_run_still_moving_over_its_last_fifth_is_flagged_and_a_settled_one_is_not(tmp_path):
    cfgs, facts, protocol = _protocol_inputs(tmp_path, ["optim.epochs=10"])
    # 10 epochs: the last fifth is epochs 9-10, measured from epoch 8
    _log(Path(cfgs["ce_instance"].run_dir) / "train", [0.3, 0.5, 0.6, 0.7, 0.75, 0.78, 0.79, 0.80, 0.81, 0.806])
    _log(Path(cfgs["ce_balanced"].run_dir) / "train", [0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.78, 0.80, 0.803, 0.801])
    conv = compare.convergence({r: {0: c} for r, c in cfgs.items()})
    assert conv["ce_instance"]["0"]["train"]["moving"] is True
    assert conv["ce_instance"]["0"]["train"]["moved"] == pytest.approx(1.0)
    assert conv["ce_balanced"]["0"]["train"]["moving"] is False  # 0.3 points, though it rose 70 before
    one = {"many": 0.5, "medium": 0.5, "few": 0.5, "overall": 0.5}
    rows = ["ce_balanced", "ce_instance"]
    summary = summarise({r: {0: one} for r in rows}, [0], "ce_balanced")
    page = compare.format_markdown(summary, rows, [0], "ce_balanced", protocol, facts, "T", conv=conv)
    flagged = [line for line in page.splitlines() if "val top-1 moved" in line]
    assert flagged == ["- `ce_instance` seed 0, `train` (the evaluated model): val top-1 moved 1.0 points over its "
                       "last 2 epochs (epochs 9-10 of 10, measured from epoch 8), ending at 80.6%."]
    assert "Flagged:" in page
    # nothing moving: the page says so and lists no run
    _log(Path(cfgs["ce_instance"].run_dir) / "train", [0.3, 0.5, 0.6, 0.7, 0.75, 0.78, 0.79, 0.80, 0.80, 0.80])
    conv = compare.convergence({r: {0: c} for r, c in cfgs.items()})
    page = compare.format_markdown(summary, rows, [0], "ce_balanced", protocol, facts, "T", conv=conv)
    assert "No run is flagged." in page and "val top-1 moved" not in page


def test_the_source_line_names_the_step_cap(tmp_path):
    _, _, protocol = _protocol_inputs(tmp_path / "a", ["train.max_steps_per_epoch=2", "data.batch_size=16"])
    assert protocol["samples_per_epoch"] == 32
    assert protocol["samples_per_epoch_source"] == ("the training split (930 images), capped by "
                                                    "train.max_steps_per_epoch=2 (steps of batch 16)")
    _, _, protocol = _protocol_inputs(tmp_path / "b", ["data.batch_size=16"])
    assert protocol["samples_per_epoch"] == 930
    assert protocol["samples_per_epoch_source"] == "the training split (930 images)"


def test_the_stale_run_warning_reaches_the_json_notes(tmp_path):
    data = _manifest(tmp_path / "data")
    out = tmp_path / "out"

    def fake(cfg):
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "metrics.json").write_text(_metrics_json(0.5))

    compare.compare(data, out, ["ce_balanced"], [0], ["optim.epochs=1"], runner=fake, log=_quiet, notes=["n"])
    report = compare.compare(data, out, ["ce_balanced"], [0], ["optim.epochs=2"], runner=_refuse, log=_quiet,
                             notes=["n"], report_only=True)
    assert report["stale_runs"] == ["ce_balanced/seed0"]
    assert report["notes"][0].startswith("Warning: 1 run(s) finished under another resolved config")
    assert report["notes"][1:] == ["n"]
    assert json.loads((out / "comparison.json").read_text())["notes"] == report["notes"]
    assert "- Warning: 1 run(s)" in (out / "comparison.md").read_text()
