"""The command lines: one-line errors with exit code 2 and nothing written before the checks pass,
``--help`` generated from the config dataclasses, the bench dispatcher's help, trackers in the config,
the shipped split lists, and the plots (per-class accuracy at 1,000 classes, training curves)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lfme_fast.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
SPLITS = REPO / "data_prep" / "splits"
PNG = b"\x89PNG\r\n\x1a\n"


def _one_line_error(capsys, prog: str = "lfme-train") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["optim.lr=-1"], "optim.lr: must be > 0"),
    (["data.root=/no/such/dataset"], "is not a prepared dataset"),
    (["data.val_split=nosuch"], "data.val_split='nosuch'"),
    (["model.pretrained=/no/such/weights.pth"], "model.pretrained: /no/such/weights.pth is not a file"),
    (["data.augment=pad_crop", "data.resolution=32"], "needs square images stored at the resolution"),
    (["log.trackers=[aim]"], "'aim' needs the 'aim' package"),
    (["log.trackers=[nosuchtracker]"], "unknown tracker 'nosuchtracker'"),
], ids=["unknown-key", "bad-value", "no-dataset", "no-split", "no-pretrained", "loader-settings", "tracker-missing",
        "tracker-unknown"])
def test_train_errors_are_one_line_and_write_nothing(fmnist_dir, tmp_path, capsys, extra, message):
    from lfme_fast.train import main

    out = tmp_path / "run"
    rc = main(["--config", str(SMOKE), "--output-dir", str(out), f"data.root={fmnist_dir}", "data.test_split=val",
               *extra])
    assert rc == 2
    assert message in _one_line_error(capsys)
    assert not out.exists(), "a run that failed its checks wrote its folder"


def test_train_missing_config_and_debug_traceback(tmp_path, capsys):
    from lfme_fast.train import main

    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in _one_line_error(capsys)
    with pytest.raises(ConfigError, match="optim.lrr"):
        main(["--config", str(SMOKE), "optim.lrr=1", "--debug"])


def test_train_argument_error_in_a_process():
    """The real process: argparse's complaint in one line, exit code 2."""
    res = subprocess.run([sys.executable, "-m", "lfme_fast.train", "--output-dir", "x"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--config" in lines[0] and lines[0].startswith("lfme-train: error:")


def test_train_help_lists_keys_and_defaults(capsys):
    from lfme_fast.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for line in ("optim.lr = 0.1", "data.backend = torch", "log.trackers = []", "train.sampler = instance",
                 "experts.thresholds = null", "lfme.temperature = 2.0", "ecl.num_experts = 3"):
        assert line in out, line
    assert "section 'lfme' (recipe lfme" in out and "section 'experts' (recipe experts, lfme" in out


def test_bench_help_and_subcommand_help(capsys):
    from lfme_fast.bench.__main__ import BENCHMARKS, main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARKS) and "student step cost" in out
    with pytest.raises(SystemExit) as exc:
        main(["nosuch"])
    assert exc.value.code == 2
    capsys.readouterr()
    for name in ("sampler", "train", "loader"):
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--json-out" in text
        # every option explains itself: its help follows on the same line or on the next, indented one
        lines = text.split("\noptions:\n", 1)[1].splitlines()
        for i, ln in enumerate(lines):
            if ln.startswith("  --"):  # an option (wrapped help lines are indented further)
                same_line = len(ln.strip().split("  ")) > 1
                next_line = i + 1 < len(lines) and lines[i + 1].startswith(" " * 10) and \
                    not lines[i + 1].strip().startswith("-")
                assert same_line or next_line, f"{name}: {ln.strip()} has no help"


def test_trackers_config_and_deprecated_tensorboard():
    cfg = load_config(SMOKE, ["log.tensorboard=true"])
    assert cfg.log.trackers == ("tensorboard",)
    assert load_config(SMOKE, ["log.trackers=[tensorboard]", "log.tensorboard=true"]).log.trackers == ("tensorboard",)
    assert load_config(SMOKE, ["log.trackers=[wandb, mlflow]"]).log.trackers == ("wandb", "mlflow")
    with pytest.raises(ConfigError, match="lists a tracker twice"):
        load_config(SMOKE, ["log.trackers=[wandb, wandb]"])


def test_dali_backend_says_how_to_install(monkeypatch):
    import importlib.util

    from lfme_fast import loaders

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvidia.dali" else real(name, *a))
    msg = loaders.backend_missing("dali")
    assert "lfme_fast[dali-cuda13]" in msg and "lfme_fast[dali-cuda12]" in msg
    assert loaders.backend_missing("torch") is None
    with pytest.raises(ImportError, match="dali-cuda12"):
        loaders._backend_factory("dali")


# ---------------------------------------------------------------------------------------------------
# shipped split lists
# ---------------------------------------------------------------------------------------------------


def test_shipped_split_lists_are_found_and_read():
    from data_prep.sources import SourceError, find_split_lists, load_class_names, parse_split_list
    from data_prep.stats import load_split_list_counts

    places = find_split_lists(SPLITS / "Places_LT")
    assert sorted(places) == ["test", "train", "val"] and all(p.name.endswith(".txt.gz") for p in places.values())
    train = parse_split_list(places["train"])
    assert len(train) == 62500 and train[0].path == "train/airfield/00004851.jpg" and train[0].label == 0
    counts = load_split_list_counts(places["train"])
    assert counts.size == 365 and counts.max() == 4980 and counts.min() == 5
    assert len(parse_split_list(places["val"])) == 7300 and len(parse_split_list(places["test"])) == 36500

    with pytest.raises(SourceError, match="--train FILE"):
        find_split_lists(SPLITS / "ImageNet_LT")  # the training list is not shipped
    imagenet = find_split_lists(SPLITS / "ImageNet_LT", skip={"train"})
    assert np.all(load_split_list_counts(imagenet["val"]) == 20)
    names = load_class_names(SPLITS / "ImageNet_LT" / "classnames.txt.gz", 1000)
    assert names[0] == "tench" and names[1] == "goldfish"
    assert np.load(SPLITS / "ImageNet_LT" / "class_count_ImageNet_LT.npy").sum() == 115846
    cats = load_class_names(SPLITS / "iNaturalist18" / "categories.json.gz", 8142)
    assert cats[0] == "Hermodice carunculata"


# ---------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------


def test_per_class_plot_at_1000_classes(tmp_path):
    """The real ImageNet-LT histogram with synthetic accuracies: renders, and the drawn subset means are
    the subsets' reported top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lfme_fast.evaluate import plot_per_class_accuracy
    from lfme_fast.subsets import split_classes

    counts = np.load(SPLITS / "ImageNet_LT" / "class_count_ImageNet_LT.npy")
    rng = np.random.default_rng(0)
    acc = np.clip(0.2 + 0.1 * np.log(counts) + rng.normal(0, 0.1, counts.size), 0, 1)
    metrics = {"train_class_counts": counts.tolist(), "per_class_top1": acc.tolist(), "convention": "lfme"}
    subsets = split_classes(counts, "lfme")
    captured = {}
    real_save = plt.Figure.savefig

    def spy(fig, *args, **kw):  # keep the figure's lines to check what was drawn
        captured["fig"] = fig
        return real_save(fig, *args, **kw)

    plt.Figure.savefig = spy
    try:
        plot_per_class_accuracy(tmp_path / "pc.png", metrics, subsets, "1,000 classes")
    finally:
        plt.Figure.savefig = real_save
    assert (tmp_path / "pc.png").read_bytes()[:8] == PNG
    ax = captured["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for s in subsets:
        mean = 100 * acc[s.classes].mean()
        assert any(lbl.startswith(f"{s.name} (") and f"mean {mean:.1f}%" in lbl for lbl in labels), labels
    assert any(lbl.startswith("moving mean") for lbl in labels)


def test_training_curves_plot(tmp_path):
    from lfme_fast.plots import plot_training_curves

    logs = {f"expert-{k}": [{"epoch": e, "loss": 2.0 / (e + 1 + k), "lr": 0.1 * (1 - e / 5)} for e in range(5)]
            for k in range(3)}
    logs["student"] = []
    path = plot_training_curves(tmp_path / "curves.png", logs, title="t")
    assert path.read_bytes()[:8] == PNG
