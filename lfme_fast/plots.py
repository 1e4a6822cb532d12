"""LFME's two schedule figures, drawn from a student run's epoch log.

* :func:`plot_expert_weights` — SpES weight ``w_l`` of each expert over the epochs (LFME Fig. 5).
* :func:`plot_instance_schedules` — SpIS: the three schedule shapes ``f(v1, t)`` (LFME Fig. 4) next to
  the run's own mean instance weight per subset over the epochs.

Both write PNGs atomically (``lfme_fast.io.atomic_path``) with matplotlib's Agg back end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lfme_fast.io import atomic_path
from lfme_fast.schedules import SCHEDULE_KINDS, instance_weight

__all__ = ["plot_expert_weights", "plot_instance_schedules", "plot_run", "plot_training_curves",
           "plot_per_class_overlay"]

#: Marker and line style per series, so lines that coincide (two experts at the same weight) stay
#: distinguishable: different markers, dash patterns and hollow/filled faces.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", "-.", ":")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig: Any, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], dict[str, list[float]]]:
    """Epochs and per-subset values of a ``{subset: value}`` field of the epoch records."""
    epochs, out = [], {}
    for r in records:
        val = r.get(key)
        if not isinstance(val, dict):
            continue
        epochs.append(int(r["epoch"]) + 1)
        for name, x in val.items():
            out.setdefault(name, []).append(np.nan if x is None else float(x))
    return epochs, out


def plot_expert_weights(path: str | Path, records: Sequence[dict[str, Any]], title: str = "") -> Path:
    """``w_l`` used in each epoch, one line per expert (LFME Fig. 5); ``records`` are the student's
    epoch log records holding ``lfme_w`` (``{subset: weight}``)."""
    plt = _plt()
    epochs, series = _series(records, "lfme_w")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for j, (name, ys) in enumerate(series.items()):
        # later experts drawn thinner and hollow on top: where weights coincide both stay visible
        ax.plot(epochs, ys, marker=_MARKERS[j % len(_MARKERS)], ms=7 - 1.5 * min(j, 3), lw=2.2 - 0.5 * min(j, 3),
                ls=_DASHES[j % len(_DASHES)], mfc="none" if j % 2 else None, label=f"expert {name}",
                zorder=2 + j)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel("SpES weight $w_l$")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "self-paced expert selection (LFME Fig. 5)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_instance_schedules(path: str | Path, records: Sequence[dict[str, Any]], kind: str = "linear",
                            v1_examples: Sequence[float] = (0.1, 0.4, 0.7), title: str = "") -> Path:
    """Left: ``f(v1, t)`` for the linear, convex and concave schedules (LFME Fig. 4), the run's own
    ``kind`` drawn solid. Right: the run's mean instance weight per subset over the epochs
    (``lfme_v_mean`` records; empty when SpIS is off)."""
    plt = _plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
    t = np.linspace(0.0, 1.0, 101)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, v1 in enumerate(v1_examples):
        for s in SCHEDULE_KINDS:
            ys = [instance_weight(float(v1), float(x), s) for x in t]
            ax0.plot(t, ys, color=colours[j % len(colours)], ls="-" if s == kind else ("--" if s == "convex" else ":"),
                     lw=1.8 if s == kind else 1.0, label=f"{s}" if j == 0 else None)
    ax0.set_xlabel("training progress t")
    ax0.set_ylabel("instance weight f(v1, t)")
    ax0.set_title(f"schedules for v1 = {', '.join(str(v) for v in v1_examples)} (this run: {kind})", fontsize=9)
    ax0.legend(fontsize=8)
    ax0.grid(alpha=0.3)
    epochs, series = _series(records, "lfme_v_mean")
    for name, ys in series.items():
        ax1.plot(epochs, ys, marker="o", ms=3, label=f"subset {name}")
    ax1.set_xlabel("epoch")
    ax1.xaxis.set_major_locator(_integer_locator())
    ax1.set_ylabel("mean SpIS weight v")
    ax1.set_title("this run: mean instance weight per subset" if series else "this run: SpIS off", fontsize=9)
    ax1.grid(alpha=0.3)
    if series:
        ax1.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run_dir: str | Path, records: Sequence[dict[str, Any]], kind: str, name: str = "") -> list[Path]:
    """Both figures into ``run_dir`` (``spes_weights.png``, ``spis_schedules.png``); returns the paths."""
    run_dir = Path(run_dir)
    epochs = [r for r in records if r.get("event") == "epoch"]
    return [plot_expert_weights(run_dir / "spes_weights.png", epochs, f"{name}: SpES weights (LFME Fig. 5)"),
            plot_instance_schedules(run_dir / "spis_schedules.png", epochs, kind,
                                    title=f"{name}: SpIS (LFME Fig. 4)")]


def plot_training_curves(path: str | Path, logs: dict[str, Sequence[dict[str, Any]]], title: str = "") -> Path:
    """``RUN/curves.png``: training loss (left) and learning rate (right) per epoch, one line per stage.

    ``logs`` maps a stage name to its epoch records (``event == "epoch"`` lines of ``STAGE/log.jsonl``);
    a stage without records yet is listed in the legend as such. With many stages (one expert per
    subset) colours repeat with other dash patterns.
    """
    plt = _plt()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (stage, records) in enumerate(logs.items()):
        epochs = [int(r["epoch"]) + 1 for r in records if "epoch" in r]
        style = {"color": colours[j % len(colours)], "ls": _DASHES[(j // len(colours)) % len(_DASHES)],
                 "marker": _MARKERS[j % len(_MARKERS)], "ms": 3}
        if not epochs:
            ax_loss.plot([], [], label=f"{stage} (no epoch yet)", **style)
            continue
        loss = [np.nan if r.get("loss") is None else float(r["loss"]) for r in records if "epoch" in r]
        lr = [np.nan if r.get("lr") is None else float(r["lr"]) for r in records if "epoch" in r]
        ax_loss.plot(epochs, loss, label=stage, **style)
        ax_lr.plot(epochs, lr, label=stage, **style)
    ax_loss.set_ylabel("training loss (epoch mean)")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    for ax in (ax_loss, ax_lr):
        ax.set_xlabel("epoch of the stage")
        ax.xaxis.set_major_locator(_integer_locator())
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7, ncol=1 + len(logs) // 8)
    fig.suptitle(f"{title}: training curves per stage" if title else "training curves per stage", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_class_overlay(path: str | Path, rows: dict[str, Sequence[float | None]], train_counts: Sequence[int],
                           class_names: Sequence[str] | None = None, title: str = "") -> Path:
    """Per-class test top-1 of several models on one figure, classes ordered by training images (head
    left, tail right): grouped bars up to 40 classes, lines with markers beyond. ``rows`` maps a model
    name to its per-class accuracies (fractions; None for a class without test images)."""
    plt = _plt()
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    x = np.arange(order.size)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.45 * order.size + 3)), 4.2))
    width = 0.8 / max(1, len(rows))
    for i, (name, acc) in enumerate(rows.items()):
        y = np.array([np.nan if a is None else 100.0 * a for a in acc], dtype=float)[order]
        if order.size <= 40:
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, y, width, label=name)
        else:
            ax.plot(x, y, _MARKERS[i % len(_MARKERS)], linestyle=_DASHES[i % len(_DASHES)], markersize=3, label=name)
    if order.size <= 40:
        names = [class_names[c] if class_names else str(c) for c in order]
        ax.set_xticks(x, [f"{n}\n({counts[c]})" for n, c in zip(names, order)], fontsize=7)
    ax.set_xlabel("class (training images), most to fewest")
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "per-class test top-1")
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(path: str | Path, summary: Mapping[str, Any], rows: Sequence[str], labels: Mapping[str, str],
                    columns: Sequence[str] = ("many", "medium", "few", "overall"), title: str = "") -> Path:
    """``<name>.png`` of a comparison: per row, a group of bars (one per column: many / medium / few /
    overall test top-1 in %), mean over seeds with sample-std error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(rows) + 2), 4.2))
    width = 0.8 / len(columns)
    for j, col in enumerate(columns):
        # a missing value (an empty subset) is no bar, not a 0 % one
        means = [float("nan") if summary[r][col]["mean"] is None else summary[r][col]["mean"] for r in rows]
        stds = [summary[r][col]["std"] or 0.0 for r in rows]
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=col)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([labels.get(r, r) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=len(columns), fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10, wrap=True)
    fig.tight_layout()
    return _save(fig, path)


def plot_val_curves(path: str | Path, curves: Mapping[str, Mapping[str, Sequence[float]]], labels: Mapping[str, str],
                    title: str = "") -> Path:
    """``<name>_curves.png``: one panel per row, its validation top-1 (%) per epoch, one line per seed
    (``curves[row][seed]``)."""
    plt = _plt()
    rows = list(curves)
    ncol = min(4, max(1, len(rows)))
    nrow = (len(rows) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False, sharey=True)
    for ax, row in zip(axes.flat, rows):
        for seed, values in curves[row].items():
            ax.plot(range(1, len(values) + 1), [100 * v for v in values], marker=".", lw=1, label=f"seed {seed}")
        ax.set_title(labels.get(row, row), fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(_integer_locator())
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("val top-1 (%)")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    if rows:
        axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
