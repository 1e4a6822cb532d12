"""Evaluation: distributed prediction gathering, many/medium/few accuracy, reports.

* :func:`predict` runs a model over a (self-sharding) loader on every process and gathers
  ``(index, label, prediction[, logits])`` from all ranks, dropping the duplicates that sharding pads
  with (rows are keyed by dataset index), so every rank ends with each sample exactly once.
* :func:`classification_metrics` turns predictions into overall top-1, per-class accuracy and per-subset
  accuracy for cardinality-adjacent subsets of the *training* counts (convention named in the output).
  Subset accuracy is the mean of its classes' accuracies (as OLTR/LFME's ``shot_acc``), which equals
  the sample mean on the balanced test sets of the LT benchmarks. Each subset also gets
  ``top1_within_subset``: accuracy on its images when the prediction is restricted to its classes,
  the task an LFME expert solves, so a full-label-space model and an expert compare like with like
  (LFME Fig. 2).
* :func:`subset_accuracy` computes that restricted accuracy from logits (used by LFME's SpES).
* :func:`evaluate` = predict + metrics; :func:`write_reports` writes ``metrics.json``, ``metrics.md``
  and ``per_class_accuracy.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lfme_fast.io import atomic_write_json, atomic_write_text
from lfme_fast.subsets import Subset, describe_convention, split_classes

__all__ = [
    "Predictions",
    "predict",
    "subset_accuracy",
    "classification_metrics",
    "evaluate",
    "write_reports",
    "metrics_markdown",
    "plot_per_class_accuracy",
]


@dataclass
class Predictions:
    """One row per dataset sample (sorted by index): ``indices``, ``labels``, ``preds`` (argmax over the
    model's outputs) and optionally ``logits`` (float32, ``(N, outputs)``); numpy arrays."""

    indices: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    logits: np.ndarray | None = None


def _gather_rows(accelerator: Any, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate row-aligned tensors from every rank (ranks may hold different row counts: padded
    with -1 rows before the gather, the caller drops rows whose index is -1)."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensors
    return [accelerator.gather(accelerator.pad_across_processes(t, dim=0, pad_index=-1)) for t in tensors]


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, accelerator: Any = None, *, keep_logits: bool = False,
            forward_fn: Any = None) -> Predictions:
    """Run ``model`` (unwrapped) over ``loader`` in eval mode and gather every rank's rows.

    ``forward_fn(model, images) -> logits`` overrides ``model(images)``. The model's train/eval mode is
    restored afterwards.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx_parts, lab_parts, pred_parts, logit_parts = [], [], [], []
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    try:
        with autocast:
            for batch in loader:
                images = batch.images.to(device, non_blocking=True)
                logits = forward_fn(model, images) if forward_fn is not None else model(images)
                idx_parts.append(torch.as_tensor(batch.indices, device=device).long().reshape(-1))
                lab_parts.append(torch.as_tensor(batch.labels, device=device).long().reshape(-1))
                pred_parts.append(logits.argmax(dim=1))
                if keep_logits:
                    logit_parts.append(logits.float())
    finally:
        model.train(was_training)
    if idx_parts:
        rows = [torch.cat(idx_parts), torch.cat(lab_parts), torch.cat(pred_parts)]
        if keep_logits:
            rows.append(torch.cat(logit_parts))
    else:  # a rank with no batch still takes part in the gather
        n_out = 0
        rows = [torch.zeros(0, dtype=torch.long, device=device) for _ in range(3)]
        if keep_logits:
            n_out = getattr(getattr(model, "classifier", None), "out_features", 0)
            rows.append(torch.zeros(0, n_out, device=device))
    rows = [r.cpu().numpy() for r in _gather_rows(accelerator, rows)]
    keep = rows[0] >= 0
    rows = [r[keep] for r in rows]
    # Sharding pads with repeated samples; keep the first row of each index (all copies are equal).
    _, first = np.unique(rows[0], return_index=True)
    rows = [r[first] for r in rows]
    return Predictions(rows[0], rows[1], rows[2], rows[3] if keep_logits else None)


def subset_accuracy(logits: Any, labels: Any, classes: Any, *, local: bool = False) -> float:
    """Top-1 on the samples whose label is in ``classes``, the prediction restricted to ``classes``.

    Args:
        logits: ``(N, C)`` over the full label space, or ``(N, len(classes))`` when ``local`` (an
            expert's outputs, column j = ``classes[j]``).
        labels: ``(N,)`` full-label-space class ids.
        classes: the subset's class ids (ascending, as ``Subset.classes``).

    Returns:
        accuracy in [0, 1], or nan when no sample belongs to the subset.
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).long().to(logits.device)
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.long, device=logits.device)
    if classes.numel() == 0:
        return math.nan
    mask = torch.isin(labels, classes)
    if not bool(mask.any()):
        return math.nan
    sub = logits[mask] if local else logits[mask][:, classes]
    if sub.shape[1] != classes.numel():
        raise ValueError(f"logits have {sub.shape[1]} columns for a subset of {classes.numel()} classes "
                         f"(local={local})")
    pred = classes[sub.argmax(dim=1)]
    return float((pred == labels[mask]).float().mean())


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def classification_metrics(preds: Predictions, class_counts: Sequence[int], convention: str = "lfme",
                           thresholds: Sequence[int] | None = None, *, split: str | None = None) -> dict[str, Any]:
    """Overall, per-class and per-subset top-1 of full-label-space predictions.

    ``class_counts`` are the *training* counts (they define the subsets). Needs ``preds.logits`` for
    ``top1_within_subset`` (absent otherwise). Accuracies are fractions in [0, 1]; a subset without
    classes or test samples reports null.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    num_classes = counts.size
    labels, pred = preds.labels, preds.preds
    correct = pred == labels
    n_per_class = np.bincount(labels, minlength=num_classes)
    hit_per_class = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(n_per_class > 0, hit_per_class / np.maximum(n_per_class, 1), np.nan)
    subsets = split_classes(counts, convention, thresholds)
    out_subsets = {}
    for s in subsets:
        accs = per_class[s.classes] if len(s) else np.zeros(0)
        accs = accs[~np.isnan(accs)]
        entry = {"range": s.range_text(), "num_classes": len(s), "num_samples": int(n_per_class[s.classes].sum()),
                 "top1": _nan_to_none(float(accs.mean())) if accs.size else None}
        if preds.logits is not None and len(s):
            entry["top1_within_subset"] = _nan_to_none(subset_accuracy(preds.logits, labels, s.classes))
        out_subsets[s.name] = entry
    return {
        "split": split,
        "num_samples": int(labels.size),
        "top1": float(correct.mean()) if labels.size else None,
        "mean_class_top1": _nan_to_none(float(np.nanmean(per_class))) if np.any(n_per_class) else None,
        "convention": describe_convention(convention, thresholds),
        "subsets": out_subsets,
        "per_class_top1": [_nan_to_none(float(a)) for a in per_class],
        "train_class_counts": counts.tolist(),
    }


def evaluate(model: torch.nn.Module, loader: Any, class_counts: Sequence[int], convention: str = "lfme",
             thresholds: Sequence[int] | None = None, accelerator: Any = None, *, split: str | None = None,
             keep_logits: bool = True) -> dict[str, Any]:
    """:func:`predict` then :func:`classification_metrics`; the same dict on every rank."""
    preds = predict(model, loader, accelerator, keep_logits=keep_logits)
    return classification_metrics(preds, class_counts, convention, thresholds, split=split)


# ---------------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def metrics_markdown(metrics: dict[str, Any], title: str = "Results", class_names: Sequence[str] | None = None) -> str:
    """A markdown report: summary table (overall and per subset) and a per-class table."""
    subs = metrics["subsets"]
    lines = [f"# {title}", "", f"Split: `{metrics.get('split')}` ({metrics['num_samples']} images). "
             f"Subsets by training count, convention {metrics['convention']}.", "",
             "| | all | " + " | ".join(subs) + " |", "|---|---|" + "---|" * len(subs),
             "| top-1 (%) | " + _pct(metrics["top1"]) + " | " + " | ".join(_pct(s["top1"]) for s in subs.values()) + " |"]
    if any("top1_within_subset" in s for s in subs.values()):
        lines.append("| top-1 within subset (%) | | "
                     + " | ".join(_pct(s.get("top1_within_subset")) for s in subs.values()) + " |")
    lines.append("| classes | " + str(len(metrics["per_class_top1"])) + " | "
                 + " | ".join(str(s["num_classes"]) for s in subs.values()) + " |")
    lines += ["", f"Mean per-class top-1: {_pct(metrics.get('mean_class_top1'))} %", "",
              "| class | name | train count | top-1 (%) |", "|---|---|---|---|"]
    for c, (n, a) in enumerate(zip(metrics["train_class_counts"], metrics["per_class_top1"])):
        name = class_names[c] if class_names is not None and c < len(class_names) else ""
        lines.append(f"| {c} | {name} | {n} | {_pct(a)} |")
    return "\n".join(lines) + "\n"


def _rolling_nanmean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean over ``window`` entries, ignoring NaN (a class without test images)."""
    ok = ~np.isnan(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


#: Up to this many classes each class is a bar; above it a dot, with a moving mean drawn through them.
BAR_CLASSES = 120


def plot_per_class_accuracy(path: str | Path, metrics: dict[str, Any], subsets: list[Subset],
                            title: str = "") -> None:
    """Per-class top-1 with classes sorted by training images (most first), readable from 10 to 8,000+
    classes: one bar per class up to :data:`BAR_CLASSES`, beyond that one small dot per class plus a
    moving mean (black). Each subset's classes are shaded in its colour, with its mean (the mean of its
    classes' accuracies, as ``metrics["subsets"]``) as a thick horizontal line labelled in the legend. The
    dashed grey line (right axis, log) is the training image count of each class."""
    from lfme_fast.plots import _plt, _save

    plt = _plt()
    counts = np.asarray(metrics["train_class_counts"], dtype=np.float64)
    acc = np.array([np.nan if a is None else 100 * a for a in metrics["per_class_top1"]])
    num = counts.size
    order = np.argsort(-counts, kind="stable")  # rank 0: the class with the most training images
    rank = np.empty(num, dtype=np.int64)
    rank[order] = np.arange(num)
    fig, ax = plt.subplots(figsize=(11, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dot = max(1.0, 14.0 - 3.5 * np.log10(max(num, 1)))  # ~7 at 100 classes, ~1 at 8,000
    for k, s in enumerate(subsets):
        if not len(s):
            continue
        colour = colours[k % len(colours)]
        ranks = rank[s.classes]
        lo, hi = ranks.min() - 0.5, ranks.max() + 0.5
        ax.axvspan(lo, hi, color=colour, alpha=0.08, lw=0)
        if num <= BAR_CLASSES:
            ax.bar(ranks, np.nan_to_num(acc[s.classes]), width=0.85, color=colour, alpha=0.55, lw=0)
        else:
            ax.scatter(ranks, acc[s.classes], s=dot, color=colour, alpha=0.45, lw=0, rasterized=True)
        vals = acc[s.classes][~np.isnan(acc[s.classes])]
        mean = float(vals.mean()) if vals.size else np.nan
        ax.hlines(mean, lo, hi, colors=colour, lw=3, zorder=4,
                  label=f"{s.name} ({s.range_text()}, {len(s)} cl.): mean {mean:.1f}%")
    if num > BAR_CLASSES:
        window = max(5, num // 40)
        ax.plot(np.arange(num), _rolling_nanmean(acc[order], window), color="black", lw=1.2, zorder=5,
                label=f"moving mean over {window} classes")
    ax.set_xlim(-0.5, num - 0.5)
    ax.set_ylim(-2, 102)
    ax.set_xlabel(f"{num} classes, sorted by training images (most to fewest)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax2 = ax.twinx()
    ax2.plot(np.arange(num), counts[order], color="0.45", lw=1.2, ls="--", label="training images (right)")
    ax2.set_yscale("log")
    ax2.set_ylabel("training images per class (log)", color="0.35")
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = ax2.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, fontsize=8, loc="upper left", bbox_to_anchor=(1.07, 1.0),
              borderaxespad=0)
    ax.set_title(title or f"per-class accuracy ({metrics['convention']})", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def write_reports(out_dir: str | Path, metrics: dict[str, Any], *, title: str = "Results",
                  class_names: Sequence[str] | None = None, convention: str = "lfme",
                  thresholds: Sequence[int] | None = None) -> list[str]:
    """Write ``metrics.json``, ``metrics.md`` and ``per_class_accuracy.png`` into ``out_dir`` (atomic);
    returns the file names. Call on the main process only."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "metrics.md", metrics_markdown(metrics, title, class_names))
    subsets = split_classes(np.asarray(metrics["train_class_counts"]), convention, thresholds)
    plot_per_class_accuracy(out_dir / "per_class_accuracy.png", metrics, subsets, title)
    return ["metrics.json", "metrics.md", "per_class_accuracy.png"]
