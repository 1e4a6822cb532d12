"""The demo's two rows share one augmentation distribution: the baseline row replays the LFME row's
stored views (same experts' store, linked), so the printed gap measures the loss, not the augmentation."""

from __future__ import annotations

import json
import os

from lfme_fast.demo import main


def test_demo_rows_share_the_stored_views(fmnist_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(fmnist_dir, data / "fmnist_lt_ir100")  # prepared already: the demo skips preparation
    out = tmp_path / "demo"
    main(["--data", str(data), "--fmnist-root", str(tmp_path), "--out", str(out), "--epochs", "1",
          "--expert-epochs", "1", "--epoch-samples", "256", "--max-steps", "2", "--views", "2", "--no-progress",
          "data.test_split=val", "experts.thresholds=[100, 20]", "eval.thresholds=[100, 20]",
          "experts.eval_test=false", "experts.batch_size=[32, 16, 8]"])
    for shared in ("experts", "offline"):
        assert (out / "cb_ce" / shared).is_symlink()
        assert (out / "cb_ce" / shared).resolve() == (out / "lfme" / shared).resolve()
    base, lfme = (json.loads((out / r / "metrics.json").read_text())["recipe"] for r in ("cb_ce", "lfme"))
    assert base["views"] == lfme["views"] == 2 and base["sampler"] == lfme["sampler"] == "class_balanced"
    assert (base["kd"], base["spes"], base["spis"]) == (False, "off", "off")
    assert (lfme["kd"], lfme["spes"], lfme["spis"]) == (True, "matched", "paper")
    report = json.loads((out / "demo.json").read_text())
    assert set(report["rows"]) == {"LFME student (KD + SpES + SpIS)", "class-balanced CE (same stored views)"}
    assert "same" in (out / "demo.md").read_text()
